"""The Scheduler on its own, over a real BlockManager and real Sequences with no model.

A step here is what the engine does around the model: schedule, run (nothing), after_step,
then append a sampled token to every sequence whose prompt is now fully computed.
"""
from mistralrs_core.engine.block_manager import BlockManager
from mistralrs_core.engine.scheduler import Scheduler
from mistralrs_core.engine.sequence import Sequence, SeqStatus

BS = 4


def seq(n_prompt: int, base: int = 0) -> Sequence:
    return Sequence(None, 0, [base + i for i in range(n_prompt)], None, None, max_tokens=64)


def step(sched: Scheduler) -> list[tuple[Sequence, int]]:
    batch = sched.schedule()
    sched.after_step(batch)
    for s, n in batch:
        if s.num_computed == s.num_tokens:
            s.append_token(5000 + len(s.output_ids))
    return batch


def sizes(batch):
    return [(s.id, n) for s, n in batch]


def test_max_seqs_limits_admission():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_seqs=2, max_batch_tokens=100)
    a, b, c = seq(5), seq(5, 100), seq(5, 200)
    for s in (a, b, c):
        sched.add(s)
    batch = step(sched)
    assert sizes(batch) == [(a.id, 5), (b.id, 5)]
    assert sched.running == [a, b] and list(sched.waiting) == [c]
    assert c.status is SeqStatus.WAITING and c.blocks == []
    sched.finish(a)
    batch = step(sched)
    assert sizes(batch) == [(b.id, 1), (c.id, 5)]     # b decodes, c takes a's place
    assert sched.running == [b, c] and not sched.waiting


def test_chunked_prefill_under_token_budget():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_seqs=4, max_batch_tokens=16)
    a = seq(40)
    sched.add(a)
    got = []
    for _ in range(4):
        batch = step(sched)
        got.append((sizes(batch), a.num_computed, len(a.blocks), len(a.block_hashes)))
    assert got == [([(a.id, 16)], 16, 4, 4),
                   ([(a.id, 16)], 32, 8, 8),
                   ([(a.id, 8)], 40, 10, 10),
                   ([(a.id, 1)], 41, 11, 10)]
    assert a.output_ids == [5000, 5001]


def test_running_sequences_go_before_waiting_ones():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_seqs=4, max_batch_tokens=10)
    a = seq(15)
    sched.add(a)
    assert sizes(step(sched)) == [(a.id, 10)]
    b = seq(6, 100)
    sched.add(b)
    assert sizes(step(sched)) == [(a.id, 5), (b.id, 5)]   # a finishes its prefill first
    assert sizes(step(sched)) == [(a.id, 1), (b.id, 1)]
    assert a.output_ids == [5000, 5001] and b.output_ids == [5000]
    # A budget used up by running sequences admits nobody.
    c = seq(3, 200)
    sched.max_batch_tokens = 2
    sched.add(c)
    assert sizes(step(sched)) == [(a.id, 1), (b.id, 1)]
    assert list(sched.waiting) == [c]


def test_preempts_newest_when_pool_is_full():
    bm = BlockManager(4, BS, enable_prefix_cache=False)
    sched = Scheduler(bm, max_seqs=4, max_batch_tokens=100)
    a, b = seq(8), seq(8, 100)
    sched.add(a)
    sched.add(b)
    assert sizes(step(sched)) == [(a.id, 8), (b.id, 8)]
    assert bm.num_free == 0
    b_slot = b.state_slot
    # a needs a third block for its 9th token: b, the newest, gives its blocks back.
    assert sizes(step(sched)) == [(a.id, 1)]
    assert sched.preemptions == 1 and b.preemptions == 1 and a.preemptions == 0
    assert b.status is SeqStatus.WAITING and list(sched.waiting) == [b] and sched.running == [a]
    assert b.blocks == [] and b.block_hashes == [] and b.num_computed == 0
    assert b.state_slot is None and sched.free_slots[-1] == b_slot
    assert len(a.blocks) == 3 and bm.num_free == 1   # b (9 tokens, 3 blocks) does not fit yet
    sched.finish(a)
    assert bm.num_free == 4
    assert sizes(step(sched)) == [(b.id, 9)]          # recomputed from position 0
    assert b.num_computed == 9 and len(b.blocks) == 3


def test_preempted_sequence_gets_its_prefix_back_from_the_cache():
    bm = BlockManager(4, BS)
    sched = Scheduler(bm, max_seqs=4, max_batch_tokens=100)
    a, b = seq(8), seq(8, 100)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert a.blocks == [0, 1] and b.blocks == [2, 3] and len(bm.by_hash) == 4
    assert sizes(step(sched)) == [(a.id, 1)]
    # b's tail block (3) was evicted first for a; its first block (2) stays cached, but b
    # cannot get the two more blocks it needs, so it gives block 2 back and waits.
    assert a.blocks == [0, 1, 3] and b.blocks == [] and b.num_computed == 0
    assert (bm.hits, bm.queries) == (4, 8 + 8 + 9)
    sched.finish(a)
    assert sizes(step(sched)) == [(b.id, 5)]          # 4 tokens come from the cache
    assert b.blocks[0] == 2 and len(b.blocks) == 3
    assert (bm.hits, bm.queries) == (8, 8 + 8 + 9 + 9)


def test_lone_sequence_that_cannot_fit_is_out_of_memory():
    bm = BlockManager(2, BS)
    sched = Scheduler(bm, max_seqs=2, max_batch_tokens=8)
    a = seq(12)
    sched.add(a)
    assert sizes(step(sched)) == [(a.id, 8)]          # first chunk fits the 2-block pool
    assert step(sched) == []                          # the rest never will
    assert sched.out_of_memory == [a] and sched.running == [] and sched.preemptions == 0
    assert a.status is SeqStatus.RUNNING              # the engine ends it ("length")
    sched.finish(a)
    assert a.status is SeqStatus.FINISHED and bm.num_free == 2 and a.state_slot is None


def test_prefix_cache_hit_on_admission_sets_num_computed():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_seqs=4, max_batch_tokens=100)
    a = seq(20)
    sched.add(a)
    step(sched)
    assert len(a.block_hashes) == 5
    sched.finish(a)
    b = seq(20)                                       # same prompt
    sched.add(b)
    batch = step(sched)
    assert sizes(batch) == [(b.id, 4)]                # 4 blocks hit; the last is recomputed for logits
    assert b.blocks[:4] == [0, 1, 2, 3] and b.num_computed == 20
    assert bm.hits == 16 and bm.queries == 40
    c = Sequence(None, 0, list(range(9)) + [777], None, None, max_tokens=64)
    sched.add(c)
    assert sizes(step(sched)) == [(b.id, 1), (c.id, 2)]   # shares the first two blocks only


def test_recurrent_state_slots_are_handed_out_and_returned():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_seqs=3, max_batch_tokens=100)
    a, b, c = seq(3), seq(3, 100), seq(3, 200)
    assert sched.free_slots == [2, 1, 0]
    sched.add(a)
    sched.add(b)
    step(sched)
    assert (a.state_slot, b.state_slot) == (0, 1) and sched.free_slots == [2]
    sched.finish(a)
    assert a.state_slot is None and sched.free_slots == [2, 0]
    sched.add(c)
    step(sched)
    assert c.state_slot == 0 and sched.free_slots == [2]
    sched.finish(b)
    sched.finish(c)
    assert sorted(sched.free_slots) == [0, 1, 2]


def test_finish_releases_blocks_running_or_waiting():
    bm = BlockManager(16, BS)
    sched = Scheduler(bm, max_seqs=1, max_batch_tokens=100)
    a, b = seq(10), seq(10, 100)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert bm.num_used == 3 and list(sched.waiting) == [b]
    sched.finish(a)
    assert a.status is SeqStatus.FINISHED and a.blocks == [] and bm.num_used == 0
    assert bm.num_free == 16 and len(bm.cached) == 2  # full blocks stay cached for reuse
    sched.finish(b)
    assert not sched.has_work and b.status is SeqStatus.FINISHED


def test_no_kv_cache_recomputes_every_step():
    bm = BlockManager(16, BS)
    sched = Scheduler(bm, max_seqs=2, max_batch_tokens=100, no_kv_cache=True)
    a = seq(9)
    sched.add(a)
    batch = step(sched)
    assert sizes(batch) == [(a.id, 9)] and len(a.blocks) == 3
    assert bm.queries == 0 and bm.by_hash == {} and a.block_hashes == []
    sched.reset_for_recompute(a)
    assert a.blocks == [] and a.num_computed == 0 and bm.num_used == 0
    batch = step(sched)
    assert sizes(batch) == [(a.id, 10)] and len(a.blocks) == 3
    sched.reset_for_recompute(a)
    assert sizes(step(sched)) == [(a.id, 11)]


def test_waiting_sequence_larger_than_the_pool_is_ended_not_spun_on():
    bm = BlockManager(2, BS)
    sched = Scheduler(bm, max_seqs=2, max_batch_tokens=100)
    big, small = seq(12), seq(3, 100)
    sched.add(big)
    sched.add(small)
    assert sizes(sched.schedule()) == [(small.id, 3)]
    assert sched.out_of_memory == [big] and big.blocks == [] and list(sched.waiting) == []
