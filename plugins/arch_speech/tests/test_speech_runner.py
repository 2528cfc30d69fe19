"""Dia through the Runner: response shape, reproducibility, batching of concurrent requests,
bad input."""
from __future__ import annotations

import threading

import attrs
import pytest

from mistralrs import Runner, SpeechLoaderType, Which

import tiny_dia

TEXT = "[S1] Hello there. [S2] Hi! How are you?"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    dia = tiny_dia.write_dia(tiny_dia.make_reference_dia(), root / "dia")
    dac = tiny_dia.write_dac(tiny_dia.make_reference_dac(), root / "dac")
    return str(dia), str(dac)


def _runner(dirs, seed=7, **kw):
    dia, dac = dirs
    # float32: the batched-equals-alone checks compare waveforms to 1e-5.
    return Runner(which=Which.Speech(model_id=dia, arch=SpeechLoaderType.Dia, dac_model_id=dac, dtype="f32"),
                  seed=seed, **kw)


def _concurrently(fn, args):
    out = [None] * len(args)

    def work(i):
        out[i] = fn(args[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_audio_shape_and_same_seed_reproduces(dirs):
    a = _runner(dirs)
    try:
        out = a.generate_audio(TEXT)
        pipe = a._pipeline(None)
        assert a.model_kind() == "speech"
        assert out.rate == 24000 and out.channels == 1
        hop = pipe.codec.cfg.hop_length
        assert len(out.pcm) > 0 and len(out.pcm) % hop == 0
        assert len(out.pcm) // hop <= pipe.sampling.max_frames
        assert all(-1.0 <= x <= 1.0 for x in out.pcm)
    finally:
        a.shutdown()
    b = _runner(dirs)
    try:
        pipe = b._pipeline(None)
        codes, _ = pipe.generate_codes(TEXT)           # the same first per-request seed as a's
        assert len(out.pcm) == codes.shape[1] * hop
        again = b.generate_audio(TEXT)                 # the second seed of the stream
    finally:
        b.shutdown()
    c = _runner(dirs)
    try:
        assert c.generate_audio(TEXT).pcm == out.pcm
        assert c.generate_audio(TEXT).pcm == again.pcm
    finally:
        c.shutdown()


def test_concurrent_requests_batch_and_each_equals_alone(dirs):
    # Sampled: a runner's seed hands each request the next seed of one stream, so four
    # concurrent requests for the same text give the four outputs four sequential ones do.
    alone = _runner(dirs)
    try:
        expected = sorted(tuple(alone.generate_audio(TEXT).pcm) for _ in range(4))
        assert len(set(expected)) == 4                 # the seeds really differ
    finally:
        alone.shutdown()
    r = _runner(dirs)
    try:
        got = _concurrently(lambda t: tuple(r.generate_audio(t).pcm), [TEXT] * 4)
        engine = r._pipeline(None).engine
        assert engine.stats["max_running"] >= 2, engine.stats
    finally:
        r.shutdown()
    assert sorted(got) == expected


def test_concurrent_greedy_different_prompts_equal_alone(dirs):
    prompts = [TEXT, "[S1] Short.", "[S2] A rather longer line of speech, with commas.", "[S1] é ü 😀"]
    r = _runner(dirs)
    try:
        pipe = r._pipeline(None)
        pipe.sampling = attrs.evolve(pipe.sampling, greedy=True)
        alone = [r.generate_audio(p).pcm for p in prompts]
        together = _concurrently(lambda p: r.generate_audio(p).pcm, prompts)
        assert pipe.engine.stats["max_running"] >= 2
    finally:
        r.shutdown()
    for a, b in zip(alone, together):
        assert len(a) == len(b)
        assert max((abs(x - y) for x, y in zip(a, b)), default=0.0) <= 1e-5


def test_bad_input_gives_clear_errors(dirs):
    dia, dac = dirs
    r = _runner(dirs)
    try:
        for bad in ("", "   "):
            with pytest.raises(ValueError, match="^prompt"):
                r.generate_audio(bad)
        with pytest.raises(ValueError, match="^prompt: .* at most 96"):
            r.generate_audio("x" * 97)
        assert len(r.generate_audio("[S1] still fine").pcm) > 0     # the engine keeps serving
    finally:
        r.shutdown()
    with pytest.raises(ValueError, match="^dac_model_id"):
        Runner(which=Which.Speech(model_id=dia, arch=SpeechLoaderType.Dia))
    with pytest.raises(FileNotFoundError, match="^dac_model_id: .*nope"):
        Runner(which=Which.Speech(model_id=dia, arch=SpeechLoaderType.Dia, dac_model_id=dac + "/nope"))
    with pytest.raises(ValueError, match="^dac_model_id: DAC weights"):   # a Dia folder is no codec
        Runner(which=Which.Speech(model_id=dia, arch=SpeechLoaderType.Dia, dac_model_id=dia))
    with pytest.raises(ValueError, match="arch"):
        Which.Speech(model_id=dia, arch="Bark", dac_model_id=dac)


def test_too_long_speech_is_cut_at_the_maximum(dirs):
    r = _runner(dirs)
    try:
        pipe = r._pipeline(None)
        pipe.sampling = attrs.evolve(pipe.sampling, max_frames=12)
        codes, truncated = pipe.generate_codes(TEXT)
        assert truncated and codes.shape[1] == 12 - 2   # frames after BOS, before the forced EOS
        assert len(r.generate_audio(TEXT).pcm) == 10 * pipe.codec.cfg.hop_length
    finally:
        r.shutdown()
