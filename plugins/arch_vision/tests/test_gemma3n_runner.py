"""Gemma 3n through the Runner (``Which.VisionPlain``, arch Gemma3n, the tiny model of
tiny_gemma3n with the real tiny MobileNetV5): image and text requests batched, each answer
equal to transformers' greedy tokens and log-probs; a chunked prefill through an image; the
prefix cache across a repeated image; an audio clip and an image in one message; broken
image and audio input refused while other requests keep running."""
import base64
import io
from functools import partial

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_gemma3n import AUD, AUDIO_TOKENS, IMG, SOFT_TOKENS, write_tiny_gemma3n  # noqa: E402
from timm_reference import import_timm  # noqa: E402
import vision_testing  # noqa: E402
from vision_testing import chat, mixed_requests, png_data_uri, random_image, run_concurrently  # noqa: E402

try:
    import_timm()
except ImportError:  # timm is a test-only dependency (the root pyproject's `test-timm` extra)
    pytest.skip("timm is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gemma3n(tmp_path_factory.mktemp("tiny_gemma3n_runner"))


@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Gemma3n, dtype="F32"),
               pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


@torch.inference_mode()
def ref_logits(ref, ids, data, spans):
    """transformers' model on embeddings: its own embedding of every id (the modality
    vocabularies included), each span's features spliced in (image: ``get_image_features``;
    audio: ``get_audio_features`` padded as ``Gemma3nModel.forward`` pads it), its per-layer
    inputs from the ids."""
    m = ref.model
    t = torch.tensor([ids])
    h = m.get_input_embeddings()(t)
    for emb, mask in ((m.embed_vision, (t >= m.embed_vision.vocab_offset) & (t < m.embed_audio.vocab_offset)),
                      (m.embed_audio, t >= m.embed_audio.vocab_offset)):
        if mask.any():
            h[mask] = emb(input_ids=t[mask][None])[0]
    for d, (start, n) in zip(data, spans):
        if isinstance(d, torch.Tensor):
            f = m.get_image_features(d[None]).pooler_output[0]
        else:
            out = m.get_audio_features(torch.from_numpy(d.mel[None]), ~torch.from_numpy(d.valid[None]))
            pad = m.embed_audio(input_ids=torch.tensor([[m.vocab_size - 1]]))[0]
            f = torch.where(out.audio_mel_mask[0, :, None], pad, out.pooler_output[0])
            f = torch.cat([f, pad.expand(n - f.shape[0], -1)])
        h[0, start:start + n] = f
    return ref(inputs_embeds=h, per_layer_inputs=m.language_model.get_per_layer_inputs(t)).logits[0].float()


def check(pipe, ref, req, res, n=6):
    return vision_testing.check_against_reference(pipe, partial(ref_logits, ref), req, res, n)


def test_runner_batches_image_and_text_requests(runner, tiny):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, ids_of = tiny
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(random_image(1)), png_data_uri(random_image(2, size=(20, 90)))
    reqs = mixed_requests(url_a, url_b)
    steps = pipe.engine.stats["steps"]
    results = run_concurrently(runner, reqs)
    prompts = [check(pipe, ref, q, r) for q, r in zip(reqs, results)]
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    assert all(p.ids.count(ids_of[IMG]) == SOFT_TOKENS * len(p.spans) for p in prompts)
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_runner_chunked_prefill_through_an_image(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 3                 # image spans are causal: chunks may split them
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(random_image(7))}}])
        steps = pipe.engine.stats["steps"]
        prompt = check(pipe, ref, req, runner.send_chat_completion_request(req))
        assert pipe.engine.stats["steps"] - steps >= len(prompt.ids) // 3
    finally:
        sched.max_batch_tokens = old


def test_same_pixels_share_the_prefix_cache(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    blocks = pipe.engine.blocks
    first = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(11))}},
                  {"type": "text", "text": "What is in this picture?"}])
    prompt = check(pipe, ref, first, runner.send_chat_completion_request(first))
    hits = blocks.hits
    check(pipe, ref, first, runner.send_chat_completion_request(first))
    assert blocks.hits - hits == ((len(prompt.ids) - 1) // 4) * 4


def _wav_data_uri(samples: np.ndarray, rate: int) -> str:
    import soundfile
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def test_audio_and_image_in_one_message(runner, tiny):
    """A clip and an image in one message: the reference runs transformers' audio encoder on
    the frames our extractor made (the extractor's own parity is test_gemma3n_audio.py's)."""
    _, ref, ids_of = tiny
    pipe = runner._pipeline(None)
    wave = np.random.default_rng(3).uniform(-0.5, 0.5, 12000).astype(np.float32)
    req = chat([{"type": "audio_url", "audio_url": {"url": _wav_data_uri(wave, 16000)}},
                {"type": "text", "text": "Transcribe, then describe"},
                {"type": "image_url", "image_url": {"url": png_data_uri(random_image(4))}}])
    prompt = check(pipe, ref, req, runner.send_chat_completion_request(req))
    assert prompt.ids.count(ids_of[AUD]) == AUDIO_TOKENS and prompt.ids.count(ids_of[IMG]) == SOFT_TOKENS
    assert [type(s.data).__name__ for s in prompt.spans] == ["Gemma3nAudioFeatures", "Tensor"]


def test_broken_audio_is_refused_and_others_keep_running(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    bad = chat([{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,bm90IGF1ZGlv"}},
                {"type": "text", "text": "?"}])
    with pytest.raises(ValueError, match="audio_url"):
        runner.send_chat_completion_request(bad)
    ok = chat("Still there?")
    check(pipe, ref, ok, runner.send_chat_completion_request(ok))


def test_broken_image_is_refused_and_others_keep_running(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    bad = chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
                {"type": "text", "text": "?"}])
    good = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(5))}},
                 {"type": "text", "text": "and this?"}])
    with pytest.raises(ValueError, match="image_url"):
        runner.send_chat_completion_request(bad)
    check(pipe, ref, good, runner.send_chat_completion_request(good))
