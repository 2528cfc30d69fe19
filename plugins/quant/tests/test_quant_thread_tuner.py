"""ThreadTuner: probes a neighbouring thread count now and then and keeps the faster."""
from mistralrs_quant.thread_tuner import ThreadTuner


def drive(tuner, cost, steps, key=1):
    """Run ``steps`` steps whose time is ``cost(threads)``; returns the counts used."""
    used = []
    for _ in range(steps):
        k = tuner.pick(key)
        used.append(k)
        tuner.record(key, cost(k))
    return used


def test_levels():
    assert ThreadTuner(1).levels == [1]
    assert ThreadTuner(2).levels == [1, 2]
    assert ThreadTuner(16).levels == [1, 2, 4, 8, 16]
    assert ThreadTuner(6).levels == [1, 3, 6]


def test_quiet_machine_keeps_all_threads_and_backs_off():
    t = ThreadTuner(2)
    used = drive(t, lambda k: 1.0 / k, 2000)
    assert t.cur == 2
    probes = used.count(1)
    assert 0 < probes <= 3 * 8          # a handful of probe steps, spaced further apart each time
    assert used[-200:].count(1) <= 3


def test_contended_machine_moves_down_and_back_up():
    t = ThreadTuner(2)
    drive(t, lambda k: {1: 1.0, 2: 4.0}[k], 40)    # another process holds a core
    assert t.cur == 1
    drive(t, lambda k: 1.0 / k, 400)                # the core is free again
    assert t.cur == 2


def test_walks_several_levels():
    t = ThreadTuner(16)
    best = 4
    drive(t, lambda k: 1.0 + abs(k.bit_length() - best.bit_length()), 3000)
    assert t.cur == best


def test_a_probe_is_judged_only_on_its_own_shape():
    t = ThreadTuner(2, first_probe=1)
    for _ in range(3):
        t.record(1, 1.0)
    assert t.pick(1) == 1                # the probe starts on shape 1
    assert t.pick(2) == 2                # another shape: the probe is dropped, not judged
    t.record(2, 0.01)
    assert t.alt is None and t.cur == 2


def test_single_thread_never_probes():
    t = ThreadTuner(1)
    assert set(drive(t, lambda k: 1.0, 100)) == {1}
