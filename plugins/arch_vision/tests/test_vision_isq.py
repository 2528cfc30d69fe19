"""In-situ quantization and UQFF for vision models (``Which.VisionPlain`` with
``in_situ_quant`` / ``write_uqff`` / ``from_uqff``), on the tiny perturbed LLaVa: the quant
plugin quantizes the language model's layers and leaves the CLIP tower and the projector
dense (as upstream's LLaVA loader does); the quantized model equals the dense model with its
text weights replaced by their dequantized values; an image request through the Runner
answers close to the float32 model; a UQFF round trip is bit-identical."""
from __future__ import annotations

import pytest
import torch

from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

pytest.importorskip("transformers")
pytest.importorskip("mistralrs_quant")

from mistralrs_quant.qlinear import GGMLQuantMethod  # noqa: E402

from test_llava import prompt_with_images  # noqa: E402
from tiny_llava import IMAGE  # noqa: E402
from vision_testing import chat, OneSequence, png_data_uri, random_image  # noqa: E402

#: the quantized model against the dense model holding its dequantized weights: only the
#: summation order differs
DEQUANT_TOL = 1e-5
#: Q8_0 against float32 on this tiny perturbed model, prefill with an image and 3 decode
#: steps. Not a parity bound: each Q8_0 weight is off by ~0.5% RMS (its fp16 block scale
#: over sqrt(12)), 16 quantized matrices compound it, and the worst logit moves most:
#: measured 5.4e-2 as max|d|/max|ref| and 2.8e-2 as ||d||/||ref||.
Q8_MAX_TOL, Q8_NORM_TOL = 1e-1, 4e-2


def _runner(out, **kw):
    from mistralrs import Runner, VisionArchitecture, Which
    isq = kw.pop("in_situ_quant", None)
    return Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.LLaVa, dtype="F32", **kw),
                  in_situ_quant=isq, pa_blk_size=4, seed=0, max_seqs=2)


@pytest.fixture(scope="module")
def q8(tiny_llava, tmp_path_factory):
    """The tiny LLaVa loaded with ISQ Q8_0, written as UQFF on the way."""
    out, _, _ = tiny_llava
    uqff = tmp_path_factory.mktemp("llava_uqff")
    r = _runner(out, in_situ_quant="Q8_0", write_uqff=str(uqff))
    yield r, uqff
    r.shutdown()


def _text_and_tower(model):
    """The checkpoint's layers (fused runtime copies, which have no HF name, left out):
    (language model's, tower's and projector's)."""
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, (Linear, Embedding)) and m.__dict__.get("hf_name")]
    text = [m for name, m in layers if name.split(".")[0] in ("model", "lm_head")]
    return text, [m for name, m in layers if name.split(".")[0] not in ("model", "lm_head")]


def _logits(model, image_token, steps=3):
    """Prefill of a prompt with one image, then ``steps`` decode steps: [T + steps, V]."""
    g = torch.Generator().manual_seed(3)
    px = [torch.randn(3, IMAGE, IMAGE, generator=g)]
    ids, spans = prompt_with_images(image_token, px, torch.randint(0, image_token, (9,), generator=g).tolist())
    run = OneSequence(model)
    out = [run.step(ids, spans)]
    for i in range(steps):
        out.append(run.step([(ids[-1] * 7 + i) % image_token]))
    return torch.cat(out)


def test_isq_quantizes_the_language_model_only(q8):
    r, _ = q8
    model = r._pipeline(None).model
    text, rest = _text_and_tower(model)
    assert len(text) == 2 * 7 + 2 and rest   # 7 linears per layer, embedding, lm_head
    for m in text:
        assert isinstance(m.qmethod, GGMLQuantMethod) and m.qmethod.spec.name == "Q8_0", m.hf_name
        assert m.weight is None
    names = set()
    for m in rest:
        assert m.qmethod is None and m.weight is not None and m.weight.dtype == torch.float32, m.hf_name
        names.add(m.hf_name.split(".")[0])
    assert names == {"vision_tower", "multi_modal_projector"}


def test_isq_model_equals_dequantized_dense_model_and_stays_close_to_float32(q8, tiny_llava):
    out, _, image_token = tiny_llava
    model = q8[0]._pipeline(None).model
    dense, _ = build_text_model(out, kind="vision")
    want_f32 = _logits(dense, image_token)
    quantized = {m.hf_name: m.qmethod.dequantize() for m in model.modules()
                 if getattr(m, "qmethod", None) is not None}
    for m in dense.modules():
        parts = getattr(m, "fused_parts", None)   # the dense load fuses q/k/v (gate/up) into one
        for part, start, stop in parts or ():
            if part in quantized:
                m.weight.data[start:stop] = quantized.pop(part)
        if not parts and m.__dict__.get("hf_name") in quantized:
            m.weight.data.copy_(quantized.pop(m.hf_name))
    assert not quantized
    got = _logits(model, image_token)
    assert max_rel_err(got, _logits(dense, image_token)) <= DEQUANT_TOL
    assert max_rel_err(got, want_f32) <= Q8_MAX_TOL
    assert float((got - want_f32).norm() / want_f32.norm()) <= Q8_NORM_TOL


def test_image_request_through_runner_agrees_with_float32(q8, tiny_llava):
    out, _, _ = tiny_llava
    req = chat([{"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": png_data_uri(random_image(1))}}], n=4)
    got = q8[0].send_chat_completion_request(req)
    dense = _runner(out)
    try:
        want = dense.send_chat_completion_request(req)
    finally:
        dense.shutdown()
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert [e.token for e in got.choices[0].logprobs.content] == [e.token for e in want.choices[0].logprobs.content]
    assert [e.logprob for e in got.choices[0].logprobs.content] == \
        pytest.approx([e.logprob for e in want.choices[0].logprobs.content], abs=0.1)


def test_unknown_isq_type_is_a_value_error(tiny_llava):
    out, _, _ = tiny_llava
    with pytest.raises(ValueError, match="unknown ISQ type"):
        _runner(out, in_situ_quant="Q4KK")


def test_uqff_round_trip_is_bit_identical(q8, tiny_llava):
    r, uqff = q8
    out, _, image_token = tiny_llava
    names = sorted(p.name for p in uqff.iterdir())
    assert "q8_0-0.uqff" in names and "residual.safetensors" in names and "preprocessor_config.json" in names
    from safetensors import safe_open
    with safe_open(str(uqff / "residual.safetensors"), "pt") as f:
        keys = set(f.keys())
    # the tower and projector travel dense in the residual; the text layers do not
    assert any(k.startswith("vision_tower.") for k in keys) and any(k.startswith("multi_modal_projector.")
                                                                    for k in keys)
    assert not any(".self_attn.q_proj.weight" in k and k.startswith("language_model.") for k in keys)
    want = _logits(r._pipeline(None).model, image_token)
    r2 = _runner(out, from_uqff=str(uqff / "q8_0-0.uqff"))
    try:
        model = r2._pipeline(None).model
        text, rest = _text_and_tower(model)
        assert all(isinstance(m.qmethod, GGMLQuantMethod) for m in text)
        assert all(m.qmethod is None for m in rest)
        assert torch.equal(_logits(model, image_token), want)
        req = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(2))}},
                    {"type": "text", "text": "What?"}], n=3)
        a, b = r.send_chat_completion_request(req), r2.send_chat_completion_request(req)
        assert [e.logprob for e in a.choices[0].logprobs.content] == \
            [e.logprob for e in b.choices[0].logprobs.content]
    finally:
        r2.shutdown()


def test_compiled_tower_under_isq(q8, tiny_llava, monkeypatch):
    """The loader still compiles the (dense) tower of a quantized model when asked, and the
    compiled tower's answer is the eager one's."""
    from mistralrs_arch_vision.towers import compiled
    out, _, _ = tiny_llava
    monkeypatch.setenv(compiled.ENV, "1")
    r = _runner(out, in_situ_quant="Q8_0")
    try:
        assert r._pipeline(None).model.vision_tower.frozen is not None
        req = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(4))}}], n=3)
        a, b = r.send_chat_completion_request(req), q8[0].send_chat_completion_request(req)
        assert [e.token for e in a.choices[0].logprobs.content] == [e.token for e in b.choices[0].logprobs.content]
        assert [e.logprob for e in a.choices[0].logprobs.content] == \
            pytest.approx([e.logprob for e in b.choices[0].logprobs.content], abs=1e-4)
    finally:
        r.shutdown()


@pytest.mark.parametrize("family, arch", [("gemma3", "Gemma3"),      # tied head: the quantized embedding
                                          ("qwen2_vl", "Qwen2VL"),   # M-RoPE, its own forward
                                          ("mllama", "VLlama")])     # cross-attention layers
def test_other_families_quantize_their_language_model_only(family, arch, tmp_path):
    import importlib
    from mistralrs import Runner, VisionArchitecture, Which
    out = tmp_path / family
    getattr(importlib.import_module(f"tiny_{family}"), f"write_tiny_{family}")(out)
    req = chat([{"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": png_data_uri(random_image(1, size=(64, 64)))}}], n=3)
    answers = []
    for isq in ("Q8_0", None):
        r = Runner(which=Which.VisionPlain(model_id=str(out), arch=getattr(VisionArchitecture, arch), dtype="F32"),
                   in_situ_quant=isq, pa_blk_size=4, seed=0, max_seqs=2)
        try:
            model = r._pipeline(None).model
            quantized = {name.split(".")[0] for name, m in model.named_modules()
                         if getattr(m, "qmethod", None) is not None}
            if isq:
                assert quantized and quantized <= {"model", "lm_head"}, quantized
                tower = [m for top in model.isq_dense_modules() for m in top.modules()
                         if isinstance(m, Linear) and m.__dict__.get("hf_name")]
                assert tower and all(m.weight is not None for m in tower)
            answers.append(r.send_chat_completion_request(req).choices[0].logprobs.content)
        finally:
            r.shutdown()
    got, want = answers
    assert [e.token for e in got] == [e.token for e in want]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=0.05)


def test_send_re_isq_requantizes_the_language_model_only(tiny_llava):
    out, _, _ = tiny_llava
    r = _runner(out, in_situ_quant="Q8_0")
    try:
        req = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(5))}}], n=3)
        before = r.send_chat_completion_request(req).choices[0].logprobs.content
        r.send_re_isq("Q4_0")
        text, rest = _text_and_tower(r._pipeline(None).model)
        # the 14 decoder linears; the embedding and head get the promoted type (Q6K, here
        # Q5_1: their 64-value rows are not whole K-quant blocks)
        assert sum(m.qmethod.spec.name == "Q4_0" for m in text) == 14
        assert not any(m.qmethod.spec.name == "Q8_0" for m in text)
        assert all(m.qmethod is None and m.weight is not None for m in rest)
        after = r.send_chat_completion_request(req).choices[0].logprobs.content
        assert [e.logprob for e in after] != [e.logprob for e in before]
        fresh = _runner(out, in_situ_quant="Q4_0")   # re-quantized = loaded at that type
        try:
            want = fresh.send_chat_completion_request(req).choices[0].logprobs.content
        finally:
            fresh.shutdown()
        assert [e.logprob for e in after] == [e.logprob for e in want]
    finally:
        r.shutdown()
