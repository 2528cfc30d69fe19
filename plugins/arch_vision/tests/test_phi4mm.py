"""Phi-4-multimodal against transformers' ``Phi4MultimodalForCausalLM`` (tiny, every parameter
perturbed): the image encoder (SigLIP over crops with patch masks, HD layout, projection; 224-pixel
crops in the tiny model, 448 released)
for images of different tile grids in one call, prefill + cached decode logits with 0, 1 and 2
images, Microsoft's checkpoint layout with its LoRA weights (upstream's rule: the vision LoRA
merged, the speech LoRA not used), prompts with ``<|image_N|>`` tags, and the Runner: an image
request batched with a text one, greedy 32 tokens identical."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_phi4mm import AUDIO_TOKEN, CROP, IMAGE_TOKEN, write_microsoft_layout, write_tiny_phi4mm  # noqa: E402
import vision_testing  # noqa: E402
from vision_testing import OneSequence, chat, png_data_uri, random_image, run_concurrently  # noqa: E402

COVERS = ["Phi4MM"]
TOL = 1e-4
HIDDEN = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_phi4mm(tmp_path_factory.mktemp("tiny_phi4mm"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


@pytest.fixture(scope="module")
def processor():
    from mistralrs_arch_vision.processors.phi4mm import Phi4MMImageProcessor
    return Phi4MMImageProcessor(crop=CROP)


def reference_image_inputs(images):
    """transformers' batch: crops padded to the most crops with zero images / all-ones masks."""
    most = max(im.pixels.shape[0] for im in images)
    m = CROP // 14
    px = torch.zeros(len(images), most, 3, CROP, CROP)
    mask = torch.ones(len(images), most, m, m)
    for k, im in enumerate(images):
        px[k, :im.pixels.shape[0]] = im.pixels
        mask[k, :im.masks.shape[0]] = im.masks
    return {"image_pixel_values": px, "image_sizes": torch.tensor([im.size for im in images]),
            "image_attention_mask": mask}


@torch.inference_mode()
def ref_image_features(ref, images, image_token):
    """The reference's ``image_embed`` on the images, split per image."""
    n = sum(im.num_tokens for im in images)
    h = ref.model.embed_tokens_extend.image_embed(torch.full((1, n), image_token), torch.zeros(1, n, HIDDEN),
                                                  **reference_image_inputs(images))[0]
    return list(h.split([im.num_tokens for im in images]))


def test_image_features_match_reference(loaded, processor):
    """A tall image of 3 tiles with padded patches and one smaller than a patch (1 tile) in
    one tower call; each alone reads the same."""
    model, ref, ids = loaded
    images = [processor(random_image(i, size)) for i, size in enumerate([(100, 400), (9, 12)])]
    assert [im.pixels.shape[0] for im in images] == [3, 2]
    assert not bool(images[0].masks.all())                    # padding patches exercised
    with torch.inference_mode():
        ours = model.image_embed(images)
    theirs = ref_image_features(ref, images, ids[IMAGE_TOKEN])
    assert [f.shape for f in ours] == [(im.num_tokens, HIDDEN) for im in images]
    assert max(max_rel_err(a, b) for a, b in zip(ours, theirs)) <= TOL
    with torch.inference_mode():
        alone = model.image_embed(images[1:])[0]
    assert max_rel_err(alone, ours[1]) <= 1e-5


def prompt_with_images(image_token, images, text_ids):
    from mistralrs_core.engine.step import FeatureSpan
    ids, spans = list(text_ids[:3]), []
    for k, im in enumerate(images):
        spans.append(FeatureSpan(start=len(ids), length=im.num_tokens, content_hash=bytes([k]), data=im))
        ids += [image_token] * im.num_tokens + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


@torch.inference_mode()
def ref_logits(ref, ids, images, clip=None):
    """transformers' own forward from its processor's inputs (at most one audio clip: its
    batched audio path differs from a clip alone, see towers/phi4mm_audio.py)."""
    kw = reference_image_inputs(images) if images else {}
    if clip is not None:
        kw.update(audio_input_features=clip.features[None], audio_embed_sizes=torch.tensor([clip.num_tokens]))
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


@torch.inference_mode()
def ref_logits_spans(ref, ids, feats, spans):
    """The reference fed embeddings with the features on the prompt's spans only (a random
    model may generate the placeholder id, which is then an ordinary token)."""
    h = ref.get_input_embeddings()(torch.tensor([ids]))
    for (start, n), f in zip(spans, feats):
        h[0, start:start + n] = f
    return ref(inputs_embeds=h).logits[0].float()


SIZES = [(300, 200), (40, 30)]      # (W, H): a 2-tile image and a 1-tile one


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(loaded, processor, n_images):
    """Prefill against transformers' own forward (its processor inputs), then cached decode
    steps against the reference fed the same image features."""
    model, ref, ids_of = loaded
    g = torch.Generator().manual_seed(n_images)
    images = [processor(random_image(10 + i, size)) for i, size in enumerate(SIZES[:n_images])]
    text = torch.randint(0, ids_of[IMAGE_TOKEN], (9,), generator=g).tolist()
    ids, spans = prompt_with_images(ids_of[IMAGE_TOKEN], images, text)
    run = OneSequence(model, num_blocks=600)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, images))
    feats = ref_image_features(ref, images, ids_of[IMAGE_TOKEN]) if images else []
    where = [(s.start, s.length) for s in spans]
    seq = list(ids)
    for i in range(3):
        seq.append((seq[-1] * 7 + 3 + i) % ids_of[IMAGE_TOKEN])
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits_spans(ref, seq, feats, where)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"


def tone(seconds=0.7, rate=16000, freq=330.0, seed=0):
    import numpy as np
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.05
    return (0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def extractor():
    from mistralrs_arch_vision.processors.phi4mm_audio import Phi4MMAudioFeatureExtractor
    return Phi4MMAudioFeatureExtractor()


@torch.inference_mode()
def ref_audio_features(ref, clip, with_images):
    """The reference's ``audio_embed`` on one clip (its projection chosen as transformers does)."""
    n = clip.num_tokens
    emb = ref.model.embed_tokens_extend.audio_embed
    return emb(torch.full((1, n), ref.config.audio_config.audio_token_id), torch.zeros(1, n, HIDDEN),
               audio_input_features=clip.features[None], audio_embed_sizes=torch.tensor([n]),
               audio_projection_mode="vision" if with_images else "speech")[0]


@pytest.mark.parametrize("with_image", [False, True])
def test_audio_prefill_and_decode_logits_match_reference(loaded, processor, extractor, with_image):
    """An audio clip alone (the speech projection) and with an image in the same prompt (the
    vision-speech projection), prefill then cached decode steps."""
    from mistralrs_core.engine.step import FeatureSpan
    model, ref, ids_of = loaded
    clip = extractor.prepare(tone(seed=int(with_image)), 16000)
    clip.mode = "vision" if with_image else "speech"
    images = [processor(random_image(21, (90, 60)))] if with_image else []
    ids, spans = [3, 17, 29], []
    for im in images:
        spans.append(FeatureSpan(start=len(ids), length=im.num_tokens, content_hash=b"i", data=im))
        ids += [ids_of[IMAGE_TOKEN]] * im.num_tokens + [40]
    spans.append(FeatureSpan(start=len(ids), length=clip.num_tokens, content_hash=b"a", data=clip))
    ids += [ids_of[AUDIO_TOKEN]] * clip.num_tokens + [51, 62, 73]
    run = OneSequence(model, num_blocks=600)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, images, clip))
    feats = (ref_image_features(ref, images, ids_of[IMAGE_TOKEN]) if images else []) + \
        [ref_audio_features(ref, clip, with_image)]
    where = [(s.start, s.length) for s in spans]
    seq = list(ids)
    for i in range(3):
        seq.append(5 + 11 * i)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits_spans(ref, seq, feats, where)[-1]))
    assert worst <= TOL, f"relative logit error {worst:.2e}"
    # the two projections differ: a wrong mode would not pass
    other = ref_audio_features(ref, clip, not with_image)
    assert max_rel_err(other, feats[-1]) > 1e-2


def test_checkpoint_names_map_to_every_parameter(loaded):
    model, _, _ = loaded
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    # feature_layer -2 of 3 layers: the last layer is neither built nor loaded
    assert len(model.image_embed.img_processor.encoder.layers) == 2


def test_long_prompt_switches_to_long_rope_factors(loaded):
    """Past original_max_position_embeddings (2048) LongRoPE's long factors apply, as in transformers."""
    model, ref, ids_of = loaded
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, ids_of[IMAGE_TOKEN], (2100,), generator=g).tolist()
    assert max_rel_err(OneSequence(model, num_blocks=600).step(ids), ref_logits(ref, ids, [])) <= TOL


# --------------------------------------------------------------------------- Microsoft's layout
@pytest.fixture(scope="module")
def microsoft(tiny, tmp_path_factory):
    """Microsoft's layout of the tiny model, and the reference with the vision LoRA merged."""
    import copy
    out, ref, ids = tiny
    ms = tmp_path_factory.mktemp("tiny_phi4mm_microsoft")
    merged = write_microsoft_layout(out, ms)
    ref_merged = copy.deepcopy(ref)
    state = ref_merged.state_dict()
    with torch.no_grad():
        for name, w in merged.items():
            state[name].copy_(w)
    return ms, ref_merged


def test_microsoft_layout_merges_vision_lora(loaded, microsoft, processor, extractor):
    """Microsoft's checkpoint (renamed image and audio tensors, LoRA-wrapped text linears)
    equals transformers' model with the vision LoRA merged into every matched linear (and not
    the speech LoRA): prefill with an image and an audio clip, then decode."""
    from mistralrs_core.engine.step import FeatureSpan
    _, _, ids_of = loaded
    ms, ref_merged = microsoft
    model, hf = build_text_model(ms, kind="vision")
    assert hf["model_type"] == "phi4mm" and model.microsoft_layout and model.audio_embed is not None
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    images = [processor(random_image(4, (120, 300)))]
    clip = extractor.prepare(tone(0.4, seed=5), 16000)
    clip.mode = "vision"
    ids, spans = [7, 8], []
    spans.append(FeatureSpan(start=len(ids), length=images[0].num_tokens, content_hash=b"i", data=images[0]))
    ids += [ids_of[IMAGE_TOKEN]] * images[0].num_tokens + [9]
    spans.append(FeatureSpan(start=len(ids), length=clip.num_tokens, content_hash=b"a", data=clip))
    ids += [ids_of[AUDIO_TOKEN]] * clip.num_tokens + [10, 11]
    run = OneSequence(model, num_blocks=600)
    assert max_rel_err(run.step(ids, spans), ref_logits(ref_merged, ids, images, clip)) <= TOL
    seq = ids + [5]
    assert max_rel_err(run.step([5])[-1], ref_logits(ref_merged, seq, images, clip)[-1]) <= TOL


def test_both_layouts_load_to_identical_logits(tiny, microsoft, tmp_path, processor):
    """transformers 5's folder holding the merged weights and Microsoft's folder give the same
    logits bit for bit (the merge is done in float32 the same way)."""
    from mistralrs_core.testing.parity import save_reference
    out, _, ids_of = tiny
    ms, ref_merged = microsoft
    import shutil
    t5 = save_reference(ref_merged, tmp_path / "t5")
    for f in out.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, t5 / f.name)
    a, _ = build_text_model(ms, kind="vision")
    b, _ = build_text_model(t5, kind="vision")
    images = [processor(random_image(6, (480, 70)))]
    ids, spans = prompt_with_images(ids_of[IMAGE_TOKEN], images, list(range(20, 31)))
    la, lb = OneSequence(a, num_blocks=600).step(ids, spans), OneSequence(b, num_blocks=600).step(ids, spans)
    assert torch.equal(la, lb)


def test_microsoft_layout_missing_lora_part_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    out, _, _ = tiny
    ms = tmp_path / "ms"
    write_microsoft_layout(out, ms)
    tensors = load_file(str(ms / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.lora_B.vision.weight"]
    save_file(tensors, str(ms / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj \(B\)"):
        build_text_model(ms, kind="vision")


def test_microsoft_config_defaults_are_the_released_model():
    """Microsoft's config.json (no tower settings) reads as Phi-4-multimodal-instruct: a
    SigLIP-so400m tower at 448 read at layer -2, LongRoPE with 3/4 of each head rotated."""
    from mistralrs_arch_vision.phi4mm import Phi4MMForCausalLM
    hf = {"model_type": "phi4mm", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192,
          "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "hidden_act": "silu",
          "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
          "partial_rotary_factor": 0.75, "rope_theta": 10000.0, "tie_word_embeddings": True,
          "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
          "sliding_window": 262144, "img_processor": None,
          "embd_layer": {"image_embd_layer": {"crop_size": 448, "hd_transform_order": "sub_glb"}},
          "vision_lora": {"layer": "layers.*", "lora_alpha": 512, "r": 256}}
    with torch.device("meta"):
        model = Phi4MMForCausalLM.from_hf_config(hf)
    c = model.cfg
    assert (c.head_dim, c.rope.rotary_dim, c.rope.rope_type, c.tie_word_embeddings) == (128, 96, "longrope", True)
    tower = model.image_embed.img_processor
    assert (tower.cfg.hidden_size, tower.cfg.image_size, tower.num_layers) == (1152, 448, 26)
    assert model.vision_lora.scale == 2.0 and model.image_token_id == 200010
    with pytest.raises(ValueError, match="hd_transform_order"):
        Phi4MMForCausalLM.from_hf_config({**hf, "embd_layer": {"image_embd_layer": {"hd_transform_order": "glb_sub"}}})


# --------------------------------------------------------------------------- prompts
def _processor(model, out):
    from mistralrs_arch_vision.phi4mm import Phi4MMProcessor
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    from tiny_phi4mm import PREPROCESSOR
    return Phi4MMProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                           tokenizer=Tokenizer.from_dir(out))


def test_tags_expand_to_placeholder_runs(loaded, tiny):
    from mistralrs_arch_vision.inputs import load_image
    model, _, ids_of = loaded
    proc = _processor(model, tiny[0])
    imgs = [load_image(png_data_uri(random_image(i, s)), where="x") for i, s in enumerate([(40, 30), (600, 200)])]
    got = proc.expand_prompt("<|user|><|image_1|>What differs from <|image_2|>?<|end|><|assistant|>", imgs)
    counts = [proc.image_processor.num_tokens(im.image.height, im.image.width) for im in imgs]
    assert [s.length for s in got.spans] == counts and counts[0] != counts[1]
    for s in got.spans:
        assert got.ids[s.start:s.end] == [ids_of[IMAGE_TOKEN]] * s.length
    assert got.ids.count(ids_of[IMAGE_TOKEN]) == sum(counts)
    assert [s.content_hash for s in got.spans] == [im.content_hash for im in imgs]
    with pytest.raises(ValueError, match=r"1 image tag\(s\) for 2 image part"):
        proc.expand_prompt("<|image_1|> and no second tag", imgs)
    with pytest.raises(ValueError, match="too extreme"):
        proc.expand_prompt("<|image_1|>", [load_image(png_data_uri(random_image(0, (2000, 4))), where="x")])


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Phi4MM, dtype="F32"),
               pa_blk_size=16, seed=0)
    yield r
    r.shutdown()


def check_against_reference(pipe, ref, req, res, n=6):
    from mistralrs_arch_vision.processors.phi4mm_audio import Phi4MMAudioClip

    def features(data):
        return [ref_audio_features(ref, d, d.mode == "vision") if isinstance(d, Phi4MMAudioClip)
                else ref_image_features(ref, [d], pipe.processor.image_token_id)[0] for d in data]
    return vision_testing.check_against_reference(pipe, partial(ref_logits_spans, ref), req, res, n, prepare=features)


def test_runner_batches_image_and_text_requests(runner, tiny):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, ids_of = tiny
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(random_image(1, (60, 500))), png_data_uri(random_image(2, (30, 20)))
    reqs = [chat([{"type": "text", "text": "<|image_1|>Describe"},
                  {"type": "image_url", "image_url": {"url": url_a}}]),
            chat("Tell me a story about the Rust type system."),
            chat([{"type": "image_url", "image_url": {"url": url_b}}, {"type": "image_url", "image_url": url_a},
                  {"type": "text", "text": "<|image_1|> and <|image_2|>"}])]
    steps = pipe.engine.stats["steps"]
    results = run_concurrently(runner, reqs)
    prompts = [check_against_reference(pipe, ref, q, r) for q, r in zip(reqs, results)]
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_runner_greedy_32_tokens_identical(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    req = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(5, (300, 150)))}},
                {"type": "text", "text": "<|image_1|>What is this?"}], n=32)
    check_against_reference(pipe, ref, req, runner.send_chat_completion_request(req), n=32)


def test_runner_refuses_bad_inputs_and_keeps_serving(runner):
    bad = [
        (chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(1))}},
               {"type": "text", "text": "no tag here"}]), "image tag"),
        (chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(1, (3000, 5)))}},
               {"type": "text", "text": "<|image_1|>"}]), "too extreme"),
        (chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
               {"type": "text", "text": "<|image_1|>"}]), "image_url"),
    ]
    for req, match in bad:
        with pytest.raises(ValueError, match=match):
            runner.send_chat_completion_request(req)
    ok = runner.send_chat_completion_request(chat("still serving?", n=2))
    assert ok.usage.completion_tokens == 2


def wav_data_uri(samples, rate=16000) -> str:
    import base64
    import io
    import soundfile
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def test_runner_audio_and_image_in_one_message(runner, tiny):
    """The spec's example: an ``audio_url`` and an ``image_url`` part referenced by
    ``<|audio_1|><|image_1|>`` in the text, batched with an audio-only request (a 22.05 kHz clip,
    resampled) and an ``input_audio`` one."""
    _, ref, ids_of = tiny
    pipe = runner._pipeline(None)
    wav = wav_data_uri(tone(0.9, seed=3))
    reqs = [chat([{"type": "audio_url", "audio_url": {"url": wav}},
                  {"type": "image_url", "image_url": {"url": png_data_uri(random_image(8, (100, 70)))}},
                  {"type": "text", "text": "<|audio_1|><|image_1|> Describe in detail what is happening."}]),
            chat([{"type": "audio_url", "audio_url": {"url": wav_data_uri(tone(0.5, 22050, seed=4), 22050)}},
                  {"type": "text", "text": "<|audio_1|>Transcribe."}]),
            chat([{"type": "input_audio",
                   "input_audio": {"data": wav.split(",", 1)[1], "format": "wav"}},
                  {"type": "text", "text": "What do you hear? <|audio_1|>"}])]
    results = run_concurrently(runner, reqs)
    prompts = [check_against_reference(pipe, ref, q, r) for q, r in zip(reqs, results)]
    assert [[type(s.data).__name__ for s in p.spans] for p in prompts] == \
        [["Phi4MMAudioClip", "Phi4MMImage"], ["Phi4MMAudioClip"], ["Phi4MMAudioClip"]]
    assert [p.spans[0].data.mode for p in prompts] == ["vision", "speech", "speech"]
    # the same clip heard with and without an image: different projections, different cache keys
    assert prompts[0].spans[0].content_hash != prompts[2].spans[0].content_hash
    assert all(p.ids.count(ids_of[AUDIO_TOKEN]) == p.spans[0].length for p in prompts)


def test_runner_refuses_bad_audio(runner):
    wav = wav_data_uri(tone(0.01))                   # 160 samples: shorter than one 25 ms frame
    bad = [(chat([{"type": "audio_url", "audio_url": {"url": wav}}, {"type": "text", "text": "<|audio_1|>"}]),
            "too short"),
           (chat([{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}},
                  {"type": "text", "text": "<|audio_1|>"}]), "audio_url"),
           (chat([{"type": "audio_url", "audio_url": {"url": wav_data_uri(tone(0.3))}},
                  {"type": "text", "text": "no tag"}]), "audio tag")]
    for req, match in bad:
        with pytest.raises(ValueError, match=match):
            runner.send_chat_completion_request(req)


def test_runner_chunked_prefill_splits_spans(runner, tiny):
    """A prompt of ~300 image and audio rows prefilled 40 tokens a step: the features are
    computed once and each chunk splices its slice (the spans are causal)."""
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 40
    try:
        req = chat([{"type": "text", "text": "Listen <|audio_1|> and look <|image_1|>."},
                    {"type": "image_url", "image_url": {"url": png_data_uri(random_image(12, (60, 90)))}},
                    {"type": "audio_url", "audio_url": {"url": wav_data_uri(tone(0.6, seed=6))}}])
        steps = pipe.engine.stats["steps"]
        prompt = check_against_reference(pipe, ref, req, runner.send_chat_completion_request(req))
        assert pipe.engine.stats["steps"] - steps >= len(prompt.ids) // 40
        assert [type(s.data).__name__ for s in prompt.spans] == ["Phi4MMAudioClip", "Phi4MMImage"]
    finally:
        sched.max_batch_tokens = old
