"""Gemma 3n (the family) against transformers' ``Gemma3nForConditionalGeneration`` (tiny,
every parameter perturbed, the tiny MobileNetV5 over timm as its image tower): image
features, the splice, the modality vocabularies' hard embeddings (``<end_of_image>``,
``<end_of_audio>``), the per-layer embeddings of ids outside the per-layer table, and the
text model, with 0, 1 and 2 images through prefill and decode, greedy tokens, a batch of
image and text sequences equal to each alone, checkpoints with the weights we skip, the
prompt expansion against transformers' ``Gemma3nProcessor``, bad inputs.

Audio (our encoder and feature extractor, towers/ and processors/gemma3n_audio.py): a clip's
rows, transformers' padding up to ``audio_soft_tokens_per_image``, ``<audio_soft_token>``
expansion, an image and a clip in one prompt."""
import json

import attrs
import numpy as np
import pytest
import torch

from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.engine.step import FeatureSpan, record
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_gemma3n import (AUD, AUDIO_TOKENS, BOA, BOI, EOA, EOI, IMAGE, IMG, SOFT_TOKENS,  # noqa: E402
                          PREPROCESSOR, ReferenceAudioExtractor, write_tiny_gemma3n)
from timm_reference import import_timm  # noqa: E402
from vision_testing import OneSequence  # noqa: E402

try:
    import_timm()
except ImportError:  # timm is a test-only dependency (the root pyproject's `test-timm` extra)
    pytest.skip("timm is not installed", allow_module_level=True)

COVERS = ["Gemma3n"]
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gemma3n(tmp_path_factory.mktemp("tiny_gemma3n"))


def load_ours(out):
    from safetensors.torch import load_file

    from mistralrs_arch_vision.gemma3n import Gemma3nForConditionalGeneration
    hf = json.loads((out / "config.json").read_text())
    model = Gemma3nForConditionalGeneration.from_hf_config(hf)
    model.load_weights(iter(load_file(str(out / "model.safetensors")).items()))
    return model.eval()


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    return load_ours(out), ref, ids


def prompt_with_images(ids_of, pixels, text):
    """text, then per image \\n\\n-less <boi> soft tokens <eoi> and more text, and an
    <end_of_audio> (its own vocabulary's hard embedding) near the end."""
    ids, spans = list(text[:3]), []
    for k, px in enumerate(pixels):
        ids.append(ids_of[BOI])
        spans.append(FeatureSpan(start=len(ids), length=SOFT_TOKENS, content_hash=bytes([k]), data=px))
        ids += [ids_of[IMG]] * SOFT_TOKENS + [ids_of[EOI]] + list(text[3 + 2 * k: 5 + 2 * k])
    return ids + [ids_of[BOA], ids_of[EOA]] + list(text[-2:]), spans


@torch.inference_mode()
def ref_logits(ref, ids, pixels):
    kw = {"pixel_values": torch.stack(pixels)} if pixels else {}
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


@torch.inference_mode()
def ref_logits_spans(ref, ids, pixels, spans, use_cache=False):
    """The reference with features on the prompt's spans only (a random model may generate a
    placeholder id, which is then an ordinary token): transformers' own embedding of the ids
    and its per-layer inputs, the image rows replaced before the per-layer projection."""
    m = ref.model
    t = torch.tensor([ids])
    h = m.get_input_embeddings()(t)
    for emb, mask in ((m.embed_vision, (t >= m.embed_vision.vocab_offset) & (t < m.embed_audio.vocab_offset)),
                      (m.embed_audio, t >= m.embed_audio.vocab_offset)):
        if mask.any():
            h[mask] = emb(input_ids=t[mask][None])[0]
    if pixels:
        feats = m.get_image_features(torch.stack(pixels)).pooler_output
        for (start, n), f in zip(spans, feats):
            h[0, start:start + n] = f
    per_layer = m.language_model.get_per_layer_inputs(t)
    if use_cache:
        return ref(inputs_embeds=h, per_layer_inputs=per_layer, use_cache=True)
    return ref(inputs_embeds=h, per_layer_inputs=per_layer).logits[0].float()


def test_image_features_match_reference(loaded):
    model, ref, _ = loaded
    px = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        theirs = ref.model.get_image_features(px).pooler_output
        ours = model.image_features(px)
    assert ours.shape == (3, SOFT_TOKENS, 64)
    assert max_rel_err(ours, theirs) <= TOL


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(loaded, n_images):
    model, ref, ids_of = loaded
    g = torch.Generator().manual_seed(n_images)
    pixels = [torch.randn(3, IMAGE, IMAGE, generator=g) for _ in range(n_images)]
    text = torch.randint(0, ids_of[BOI], (9,), generator=g).tolist()
    ids, spans = prompt_with_images(ids_of, pixels, text)
    run = OneSequence(model)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, pixels))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % ids_of[BOI])
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq, pixels)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"
    # the same through the span-wise reference (what greedy decoding below compares with)
    where = [(s.start, s.length) for s in spans]
    assert max_rel_err(OneSequence(model).step(ids, spans), ref_logits_spans(ref, ids, pixels, where)) <= TOL


def test_greedy_32_tokens_with_two_images(loaded):
    model, ref, ids_of = loaded
    g = torch.Generator().manual_seed(2)
    pixels = [torch.randn(3, IMAGE, IMAGE, generator=g) for _ in range(2)]
    ids, spans = prompt_with_images(ids_of, pixels, torch.randint(0, ids_of[BOI], (9,), generator=g).tolist())
    where = [(s.start, s.length) for s in spans]
    run, seq, ours, theirs = OneSequence(model), list(ids), [], []
    logits = run.step(ids, spans)[-1]
    for _ in range(32):
        ours.append(int(logits.argmax()))
        logits = run.step(ours[-1:])[-1]
    # the reference with its own cache: the prompt's embeddings once, then one token a step
    with torch.inference_mode():
        out = ref_logits_spans(ref, seq, pixels, where, use_cache=True)
        for _ in range(32):
            theirs.append(int(out.logits[0, -1].argmax()))
            out = ref(input_ids=torch.tensor([theirs[-1:]]), cache=out.past_key_values, use_cache=True)
    assert ours == theirs


def test_chunked_prefill_through_an_image(loaded):
    """Chunks that split the image's run of placeholders: each chunk splices its slice."""
    model, ref, ids_of = loaded
    px = [torch.randn(3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(8))]
    ids, spans = prompt_with_images(ids_of, px, list(range(20, 29)))
    span = spans[0]
    run, outs = OneSequence(model), []
    for a, b in ((0, span.start + 2), (span.start + 2, len(ids) - 3), (len(ids) - 3, len(ids))):
        rec_spans = [span] if a < span.end and b > span.start else []
        outs.append(_chunk(run, ids[a:b], rec_spans))
    assert max_rel_err(torch.cat(outs), ref_logits(ref, ids, px)) <= TOL


@torch.inference_mode()
def _chunk(run, ids, spans):
    """One prefill chunk, splicing only the span rows it covers (as the model runner does)."""
    rec = record(ids, run.pos, run.blocks, spans=tuple(spans))
    tok, pos, meta = build_metadata([rec], run.block_size, "cpu")
    h = run.model.embed(tok)
    rows, feats = [], []
    for at, span, first, n in rec.span_rows():
        f = run.model.encode_features([span])[0]
        rows.append(torch.arange(at, at + n))
        feats.append(f[first:first + n])
    if rows:
        h = run.model.merge_features(h, torch.cat(rows), torch.cat(feats))
    run.pos += len(ids)
    return run.model.compute_logits(run.model.forward_embeds(h, pos, meta, run.caches))


def test_placeholder_ids_embed_like_the_reference(loaded):
    """<end_of_image> / <end_of_audio> come from their own vocabularies; the per-layer rows of
    ids outside the per-layer table are row 0's (the test fails if either is skipped)."""
    model, ref, ids_of = loaded
    t = torch.tensor([ids_of[EOI], ids_of[IMG], ids_of[EOA], ids_of[AUD], 5])
    with torch.inference_mode():
        ours = model.embed(t)
        per_layer = ref.model.language_model.get_per_layer_inputs(t[None])[0].flatten(1)
        text = ref.model.get_input_embeddings()(t)
        row0 = ref.model.language_model.get_per_layer_inputs(torch.tensor([[0]]))[0, 0].flatten()
    h = ours[:, :64]
    assert torch.allclose(ours[:, 64:], per_layer)
    assert all(torch.equal(ours[i, 64:], row0) for i in range(4))
    assert torch.allclose(h[4], text[4])
    for i in range(4):
        assert not torch.allclose(h[i], text[i])          # not the text table's rows


def test_checkpoint_with_shared_layers_kv_weights_and_audio_tower_loads(tmp_path, loaded):
    """Released checkpoints carry k/v projections for the KV-shared layers and the audio
    tower's weights: both are skipped, and the model is the same."""
    from safetensors.torch import load_file, save_file
    model, _, ids_of = loaded
    out, _, _ = write_tiny_gemma3n(tmp_path)
    weights = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("model.audio_tower.") for k in weights)
    for name in ("k_proj", "v_proj"):
        weights[f"model.language_model.layers.5.self_attn.{name}.weight"] = torch.randn(32, 64)
    weights["model.language_model.layers.4.self_attn.k_norm.weight"] = torch.randn(16)
    save_file(weights, str(out / "model.safetensors"))
    other = load_ours(out)
    ids, spans = prompt_with_images(ids_of, [torch.randn(3, IMAGE, IMAGE)], list(range(20, 29)))
    assert torch.equal(OneSequence(other).step(ids, spans), OneSequence(model).step(ids, spans))


# --------------------------------------------------------------------------- the processor
class _Pixels:
    """A stand-in image processor (the real one is processors/gemma3n.py)."""

    def to_pixels(self, image):
        return torch.zeros(3, IMAGE, IMAGE)


def _processor(model, out):
    from mistralrs_arch_vision.gemma3n import Gemma3nProcessor
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    return Gemma3nProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                            tokenizer=Tokenizer.from_dir(out), image_processor=_Pixels())


def test_prompt_expansion_matches_transformers_processor(loaded, tiny):
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor, PreTrainedTokenizerFast, \
        SiglipImageProcessor

    from mistralrs_arch_vision.inputs import load_image
    from vision_testing import png_data_uri, random_image
    model, _, ids_of = loaded
    out = tiny[0]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), extra_special_tokens={
        "boi_token": BOI, "eoi_token": EOI, "image_token": IMG, "boa_token": BOA, "eoa_token": EOA,
        "audio_token": AUD})
    ref = Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(),
                           image_processor=SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}),
                           tokenizer=tok, image_seq_length=SOFT_TOKENS, audio_seq_length=3)
    images = [random_image(i, size) for i, size in enumerate([(24, 90), (100, 25), (9, 7)])]
    text = f"<|im_start|>user\n{IMG}Describe {IMG}\nand\n\n{IMG}<|im_end|>\n<|im_start|>assistant\n"
    want = ref(text=text, images=images, return_tensors="pt")["input_ids"][0].tolist()
    got = _processor(model, out).expand_prompt(text, [load_image(png_data_uri(im), where="x") for im in images])
    assert got.ids == want
    assert [(s.start, s.length) for s in got.spans] == \
        [(i, SOFT_TOKENS) for i in range(len(want)) if want[i] == ids_of[IMG] and want[i - 1] == ids_of[BOI]]
    assert not any(s.bidirectional for s in got.spans)


def test_bad_prompts_are_refused(loaded, tiny):
    from mistralrs_arch_vision.inputs import LoadedAudio, load_image
    from vision_testing import png_data_uri, random_image
    model, _, _ = loaded
    proc = _processor(model, tiny[0])
    img = load_image(png_data_uri(random_image(1)), where="x")
    with pytest.raises(ValueError, match="2 image placeholder"):
        proc.expand_prompt(f"{IMG} and {IMG}", [img])
    clip = LoadedAudio(samples=torch.zeros(4000).numpy(), rate=16000, content_hash=b"x")
    with pytest.raises(ValueError, match="1 audio placeholder"):
        proc.expand_prompt(f"{IMG} {AUD}", [img], [])
    deaf = attrs.evolve(proc, audio_extractor=None)
    assert deaf.prepare_audio is None and proc.prepare_audio is not None
    with pytest.raises(ValueError, match="does not take audio"):
        deaf.expand_prompt(f"{IMG} {AUD}", [img], [clip])


def test_bad_configs_are_refused(tiny):
    from mistralrs_arch_vision.gemma3n import Gemma3nForConditionalGeneration
    hf = json.loads((tiny[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="image_token_id"):
        Gemma3nForConditionalGeneration.from_hf_config({**hf, "image_token_id": 5})
    with pytest.raises(ValueError, match="overlaps"):
        Gemma3nForConditionalGeneration.from_hf_config({**hf, "vision_config": {**hf["vision_config"],
                                                                                 "vocab_size": 3}})
    with pytest.raises(ValueError, match="vision_soft_tokens_per_image"):
        Gemma3nForConditionalGeneration.from_hf_config({**hf, "vision_soft_tokens_per_image": 256})


def test_batch_of_image_and_text_sequences_equals_each_alone(loaded):
    """Three sequences (two images, none, one) prefilled in one step of the model runner,
    then decoded together, against each run alone: slot mapping, splicing offsets and the
    shared layers' reads of their source blocks across sequences."""
    from mistralrs_core.engine.model_runner import ModelRunner
    model, _, ids_of = loaded
    g = torch.Generator().manual_seed(11)
    prompts = []
    for n_img, n_text in ((2, 9), (0, 14), (1, 11)):
        px = [torch.randn(3, IMAGE, IMAGE, generator=g) for _ in range(n_img)]
        prompts.append(prompt_with_images(ids_of, px, torch.randint(0, ids_of[BOI], (n_text,), generator=g).tolist()))
    per_seq = 12
    runner = ModelRunner(model, num_blocks=3 * per_seq, block_size=4, device="cpu", cache_dtype=model.dtype)
    blocks = [list(range(i, 3 * per_seq, 3)) for i in range(3)]          # interleaved block ids
    recs = [record(ids, 0, blocks[i], spans=tuple(sp), num_logits=len(ids)) for i, (ids, sp) in enumerate(prompts)]
    batched = runner.run(recs)
    alone = [OneSequence(model) for _ in prompts]
    off, worst, last = 0, 0.0, []
    for run, (ids, sp) in zip(alone, prompts):
        mine = run.step(ids, sp)
        worst = max(worst, max_rel_err(batched[off:off + len(ids)], mine))
        off += len(ids)
        last.append(int(mine[-1].argmax()))
    lengths = [len(ids) for ids, _ in prompts]
    for _ in range(3):
        out = runner.run([record([t], n, blocks[i]) for i, (t, n) in enumerate(zip(last, lengths))])
        for i, run in enumerate(alone):
            worst = max(worst, max_rel_err(out[i], run.step([last[i]])[-1]))
        last, lengths = [int(r.argmax()) for r in out], [n + 1 for n in lengths]
    assert worst <= TOL



# --------------------------------------------------------------------------- audio
def _clip(seed: int, seconds: float, pad_frames: int = 0):
    """A random clip's features (transformers' extractor); ``pad_frames`` padding frames
    after it, as a clip gets when batched with a longer one (what makes encoder rows padded)."""
    samples = np.random.default_rng(seed).uniform(-0.5, 0.5, int(16000 * seconds)).astype(np.float32)
    f = ReferenceAudioExtractor()(samples)
    f.mel = np.concatenate([f.mel, np.zeros((pad_frames, f.mel.shape[1]), np.float32)])
    f.valid = np.concatenate([f.valid, np.zeros(pad_frames, bool)])
    return f


def prompt_with_media(ids_of, pixels, clips, text):
    """text, an image run, text, an audio run (<boa> placeholders <eoa>), text."""
    ids, spans = list(text[:3]), []
    for px in pixels:
        ids.append(ids_of[BOI])
        spans.append(FeatureSpan(start=len(ids), length=SOFT_TOKENS, content_hash=b"i", data=px))
        ids += [ids_of[IMG]] * SOFT_TOKENS + [ids_of[EOI]] + list(text[3:5])
    for k, clip in enumerate(clips):
        ids.append(ids_of[BOA])
        spans.append(FeatureSpan(start=len(ids), length=AUDIO_TOKENS, content_hash=bytes([k]), data=clip))
        ids += [ids_of[AUD]] * AUDIO_TOKENS + [ids_of[EOA]] + list(text[5:7])
    return ids + list(text[-2:]), spans


@torch.inference_mode()
def ref_logits_media(ref, ids, pixels, clips):
    kw = {"pixel_values": torch.stack(pixels)} if pixels else {}
    if clips:
        # one clip per call, as transformers' processor pads a batch of clips together
        assert len(clips) == 1
        kw.update(input_features=torch.from_numpy(clips[0].mel[None]),
                  input_features_mask=torch.from_numpy(clips[0].valid[None]))
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


@pytest.mark.parametrize("with_image", [False, True])
def test_audio_clip_logits_match_reference(loaded, with_image):
    """A clip (and an image in the same message): the encoder's rows, its padded rows and the
    rows up to audio_soft_tokens_per_image as transformers fills them, prefill + decode."""
    model, ref, ids_of = loaded
    g = torch.Generator().manual_seed(21)
    pixels = [torch.randn(3, IMAGE, IMAGE, generator=g)] if with_image else []
    clip = _clip(3, 0.6, pad_frames=40)
    with torch.inference_mode():
        enc, ok = model.audio_tower(torch.from_numpy(clip.mel[None]), torch.from_numpy(clip.valid[None]))
    assert 0 < enc.shape[1] < AUDIO_TOKENS and not ok.all()         # both kinds of padding are exercised
    ids, spans = prompt_with_media(ids_of, pixels, [clip], torch.randint(0, ids_of[BOI], (9,), generator=g).tolist())
    run = OneSequence(model)
    worst = max_rel_err(run.step(ids, spans), ref_logits_media(ref, ids, pixels, [clip]))
    seq = list(ids)
    for i in range(3):
        seq.append((seq[-1] * 5 + 1 + i) % ids_of[BOI])
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits_media(ref, seq, pixels, [clip])[-1]))
    assert worst <= TOL, f"audio{' + image' if with_image else ''}: relative logit error {worst:.2e}"


def test_prompt_expansion_with_audio_matches_transformers_processor(loaded, tiny):
    from transformers import Gemma3nProcessor, PreTrainedTokenizerFast, SiglipImageProcessor

    from mistralrs_arch_vision.inputs import LoadedAudio, load_image
    from vision_testing import png_data_uri, random_image
    model, _, ids_of = loaded
    out = tiny[0]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), extra_special_tokens={
        "boi_token": BOI, "eoi_token": EOI, "image_token": IMG, "boa_token": BOA, "eoa_token": EOA,
        "audio_token": AUD})
    ex = ReferenceAudioExtractor()
    ref = Gemma3nProcessor(feature_extractor=ex.fe, image_processor=SiglipImageProcessor(
        size={"height": IMAGE, "width": IMAGE}), tokenizer=tok, image_seq_length=SOFT_TOKENS,
        audio_seq_length=AUDIO_TOKENS)
    rng = np.random.default_rng(4)
    waves = [rng.uniform(-0.5, 0.5, 14000).astype(np.float32), rng.uniform(-0.5, 0.5, 9000).astype(np.float32)]
    text = f"<|im_start|>user\n{AUD}Transcribe {IMG} and\n{AUD}<|im_end|>\n<|im_start|>assistant\n"
    want = ref(text=text, images=[random_image(1)], audio=waves, return_tensors="pt")
    audios = [LoadedAudio(samples=w, rate=16000, content_hash=bytes([k])) for k, w in enumerate(waves)]
    got = _processor(model, out).expand_prompt(text, [load_image(png_data_uri(random_image(1)), where="x")],
                                               audios)
    assert got.ids == want["input_ids"][0].tolist()
    kinds = ["image" if isinstance(s.data, torch.Tensor) else "audio" for s in got.spans]
    assert kinds == ["audio", "image", "audio"]
    assert [s.content_hash for s in got.spans if s.length == AUDIO_TOKENS] == [b"\x00", b"\x01"]
    for span, k in zip([s for s in got.spans if s.length == AUDIO_TOKENS], range(2)):
        theirs = ex(waves[k])           # transformers' features of the clip alone
        assert np.array_equal(span.data.valid, theirs.valid)
        assert np.allclose(span.data.mel, theirs.mel, rtol=0, atol=1e-4)


def test_clips_of_several_lengths_in_one_call_equal_each_alone(loaded):
    model, _, _ = loaded
    clips = [_clip(7, 0.5), _clip(8, 0.7), _clip(9, 0.5)]
    spans = [FeatureSpan(start=0, length=AUDIO_TOKENS, content_hash=bytes([k]), data=c) for k, c in enumerate(clips)]
    with torch.inference_mode():
        together = model.encode_features(spans)
        alone = [model.encode_features([s])[0] for s in spans]
    assert all(t.shape == (AUDIO_TOKENS, 64) for t in together)
    assert max(max_rel_err(t, a) for t, a in zip(together, alone)) <= 1e-5


# gemma-3n-E2B-it's config.json (the keys that shape the model; text_config as in test_gemma3n_text).
def _e2b():
    from test_gemma3n_text import E2B_TEXT
    return {
        "architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n", "eos_token_id": [1, 106],
        "audio_soft_tokens_per_image": 188, "audio_token_id": 262273, "boa_token_id": 256000,
        "boi_token_id": 255999, "eoa_token_id": 262272, "eoi_token_id": 262144, "image_token_id": 262145,
        "vision_soft_tokens_per_image": 256, "text_config": E2B_TEXT,
        "audio_config": {"hidden_size": 1536, "input_feat_size": 128, "model_type": "gemma3n_audio",
                         "rms_norm_eps": 1e-06, "vocab_offset": 262272, "vocab_size": 128},
        "vision_config": {"architecture": "mobilenetv5_300m_enc", "hidden_size": 2048, "model_type": "gemma3n_vision",
                          "rms_norm_eps": 1e-06, "vocab_offset": 262144, "vocab_size": 128},
    }


def test_released_config_reads_like_transformers():
    from mistralrs_arch_vision.gemma3n import Gemma3nForConditionalGeneration
    hf = _e2b()
    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration.from_hf_config(hf, vision_tower=torch.nn.Identity(),
                                                               audio_tower=torch.nn.Identity())
    ref = transformers.Gemma3nConfig(**hf)
    for key in ("boi_token_id", "eoi_token_id", "image_token_id", "boa_token_id", "eoa_token_id", "audio_token_id",
                "vision_soft_tokens_per_image", "audio_soft_tokens_per_image"):
        assert getattr(model, key) == getattr(ref, key), key
    for ours, theirs in ((model.embed_vision, ref.vision_config), (model.embed_audio, ref.audio_config)):
        assert (ours.vocab_offset, ours.vocab_size, ours.embedding.embedding_dim) == \
            (theirs.vocab_offset, theirs.vocab_size, theirs.hidden_size)
    # <end_of_image> and the image token are the vision vocabulary's first two ids, as in the release
    assert model.embed_vision.vocab_offset == model.eoi_token_id == model.cfg.per_layer_vocab
    assert model.cfg.vocab_size == model.embed_audio.vocab_offset + model.embed_audio.vocab_size
