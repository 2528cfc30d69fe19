"""GraniteMoeHybrid (Mamba-2 + attention + MoE) against transformers, and its per-sequence
recurrent state through the engine: chunked prefill, concurrent requests, preemption."""
from __future__ import annotations

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mistralrs import CompletionRequest, Runner, Which  # noqa: E402
from mistralrs_core.testing.parity import (SingleSequence, check_batched_equals_alone, check_family,  # noqa: E402
                                           load_for_test, max_rel_err, our_greedy, perturb_parameters,
                                           random_prompt, reference_logits, save_reference)
from mistralrs_core.testing.tiny import tokenizer_vocab_size, write_tiny_tokenizer  # noqa: E402

COVERS = ["GraniteMoeHybrid"]
V = 256
TOL = 1e-4
# Two Mamba groups, a scan chunk (8) shorter than the prompts, every Granite multiplier
# away from 1, and no EOS (the reference's greedy run would forbid it, ours would not).
BASE = dict(hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
            layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8, mamba_d_head=16,
            mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=8, shared_intermediate_size=40,
            embedding_multiplier=2.0, residual_multiplier=0.7, attention_multiplier=0.3, logits_scaling=1.5,
            max_position_embeddings=256, eos_token_id=None)


def granite(vocab=V, **kw):
    torch.manual_seed(0)
    return transformers.GraniteMoeHybridForCausalLM(
        transformers.GraniteMoeHybridConfig(**{**BASE, "vocab_size": vocab, **kw}))


@pytest.mark.parametrize("variant", ["moe_nope", "dense_rope"])
def test_granite_hybrid_parity(tmp_path, variant):
    kw = {} if variant == "moe_nope" else dict(position_embedding_type="rope", num_local_experts=0)
    ref = granite(**kw)
    model, worst = check_family(ref, tmp_path, "GraniteMoeHybrid", [random_prompt(5, V, 1), random_prompt(23, V, 2)])
    batched = check_batched_equals_alone(model, [random_prompt(n, V, 10 + n) for n in (5, 17, 33)])
    print(f"GraniteMoeHybrid {variant}: max rel err {worst:.2e}, batched vs alone {batched:.2e}")
    assert worst <= TOL and batched <= TOL
    assert sum(model.cfg.mamba_layers) == 3


def test_chunked_prefill_continues_state(tmp_path):
    ref = granite().float().eval()
    perturb_parameters(ref)
    model = load_for_test(save_reference(ref, tmp_path), "GraniteMoeHybrid")
    prompt = random_prompt(30, V, 4)
    run = SingleSequence(model)
    ours = torch.cat([run.step(prompt[a:b]) for a, b in ((0, 7), (7, 8), (8, 19), (19, 30))])
    err = max_rel_err(ours, reference_logits(ref, prompt))
    print(f"GraniteMoeHybrid chunked prefill: max rel err {err:.2e}")
    assert err <= TOL


# --- through the engine -----------------------------------------------------------

@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("granite")
    write_tiny_tokenizer(d)
    ref = granite(vocab=tokenizer_vocab_size(d)).float().eval()
    perturb_parameters(ref)
    return save_reference(ref, d)


WORDS = "the quick brown fox jumps over the lazy dog and then the compiler borrows a lifetime".split()


def prompt_of(n_words: int, salt: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(n_words))


def greedy(runner, prompts, n):
    out = [None] * len(prompts)

    def work(i):
        req = CompletionRequest(prompt=prompts[i], model="default", max_tokens=n, temperature=0.0, ignore_eos=True)
        out[i] = runner.send_completion_request(req).choices[0].text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def alone(pipe, prompt, n):
    return pipe.tokenizer.decode(our_greedy(pipe.model, pipe.tokenizer.encode(prompt), n))


def test_runner_concurrent_chunked_prefill(granite_dir):
    r = Runner(which=Which.Plain(model_id=str(granite_dir), dtype="F32"), seed=0, pa_blk_size=8)
    try:
        pipe = r._pipeline(None)
        assert not pipe.engine.blocks.enable_prefix_cache      # recurrent state: no prefix cache
        pipe.engine.scheduler.max_batch_tokens = 8              # several prefill chunks, mixed with decodes
        prompts = [prompt_of(14), prompt_of(9, salt=3)]
        got = greedy(r, prompts, 12)
        assert got == [alone(pipe, p, 12) for p in prompts]
        assert pipe.engine.stats["steps"] > 12 + 2
        # The same prompt again computes from scratch and gives the same text.
        assert greedy(r, prompts[:1], 12) == got[:1]
    finally:
        r.shutdown()


def test_runner_preemption_resets_state(granite_dir):
    # 8 blocks of 8 tokens for three requests of ~30 tokens each: someone gets preempted.
    r = Runner(which=Which.Plain(model_id=str(granite_dir), dtype="F32"), seed=0, pa_blk_size=8, pa_ctxt_len=64)
    try:
        pipe = r._pipeline(None)
        prompts = [prompt_of(8, salt=i) for i in range(3)]
        got = greedy(r, prompts, 20)
        assert got == [alone(pipe, p, 20) for p in prompts]
        assert pipe.engine.scheduler.preemptions > 0
        assert sorted(pipe.engine.scheduler.free_slots) == list(range(pipe.engine.config.max_seqs))
    finally:
        r.shutdown()
