"""LLaVa-NeXT against transformers (tiny, every parameter perturbed): the anyres processor
(tiles, image sizes, placeholder counts) against ``LlavaNextImageProcessorPil`` +
``LlavaNextProcessor``; packed image features; prefill + cached decode logits with 0, 1 and
2 images of different sizes, greedy tokens; then the Runner batching an image request with
a text request."""

import numpy as np
from functools import partial

import pytest
import torch
from PIL import Image

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

import vision_testing  # noqa: E402
from vision_testing import chat, mixed_requests, OneSequence, png_data_uri, run_concurrently  # noqa: E402
from tiny_llava import IMAGE, PATCH  # noqa: E402
from tiny_llava_next import NEXT_PREPROCESSOR, PINPOINTS, write_tiny_llava_next  # noqa: E402

from mistralrs_arch_vision.processors.llava_next import (LlavaNextImageProcessor, anyres_token_count,  # noqa: E402
                                                         best_resolution)

COVERS = ["LLaVaNext"]
TOL = 1e-4
PER_SIDE = IMAGE // PATCH
# (width, height): tall, wide, tiny, square, odd, very wide (3x1 canvas), exact canvas, then two whose
# fitted size rounds up (not to nearest) and whose canvas padding is odd (more on the bottom/right)
SHAPES = [(20, 61), (50, 23), (9, 13), (60, 60), (37, 29), (120, 31), (56, 28), (33, 71), (101, 40)]


def image(w, h, seed=0):
    rng = np.random.default_rng(seed + w * 1000 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llava_next(tmp_path_factory.mktemp("tiny_llava_next"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, image_token = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, image_token


@pytest.fixture(scope="module")
def hf_processor(tiny):
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    out, _, _ = tiny
    cfg = {k: v for k, v in NEXT_PREPROCESSOR.items() if k != "image_processor_type"}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(**cfg), tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


# --------------------------------------------------------------------------- processor
@pytest.mark.parametrize("shape", SHAPES)
def test_processor_matches_transformers(hf_processor, loaded, shape):
    model, _, image_token = loaded
    img = image(*shape)
    theirs = hf_processor(images=[img], text="<image>", return_tensors="np")
    got = LlavaNextImageProcessor.from_config(NEXT_PREPROCESSOR)(img)
    want = torch.as_tensor(np.asarray(theirs["pixel_values"][0]))
    assert got.tiles.dtype == torch.float32 and got.tiles.shape == want.shape
    assert torch.allclose(got.tiles, want, rtol=0, atol=1e-6), float((got.tiles - want).abs().max())
    assert got.image_size == tuple(int(x) for x in theirs["image_sizes"][0])
    count = int((theirs["input_ids"][0] == image_token).sum())
    assert anyres_token_count(*got.image_size, PINPOINTS, IMAGE, PER_SIDE) == count
    assert model.tokens_for(*got.image_size) == count


@pytest.mark.parametrize("variant", [
    # Tiles cut at the crop size, then each resized up and cropped back; bilinear.
    {"size": {"shortest_edge": 32}, "resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    # No crop: the tiles keep the resize's size (the canvas is still cut at crop height).
    {"size": {"shortest_edge": 32}, "do_center_crop": False},
])
@pytest.mark.parametrize("shape", [(20, 61), (120, 31), (9, 13)])
def test_processor_config_variants_match_transformers(variant, shape):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    cfg = {**{k: v for k, v in NEXT_PREPROCESSOR.items() if k != "image_processor_type"}, **variant}
    img = image(*shape)
    want = torch.as_tensor(np.asarray(LlavaNextImageProcessorPil(**cfg)(images=[img], return_tensors="np")
                                      ["pixel_values"][0]))
    got = LlavaNextImageProcessor.from_config(cfg)(img).tiles
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-6), float((got - want).abs().max())


def test_best_resolution_picks_the_reference_canvas():
    from transformers.image_processing_utils import select_best_resolution
    for h in range(5, 130, 7):
        for w in range(5, 130, 11):
            assert best_resolution(h, w, PINPOINTS) == tuple(select_best_resolution((h, w), PINPOINTS))


def test_non_rgb_and_pinpoints_checks():
    proc = LlavaNextImageProcessor.from_config(NEXT_PREPROCESSOR)
    rgba = image(30, 40).convert("RGBA")
    assert torch.equal(proc(rgba).tiles, proc(rgba.convert("RGB")).tiles)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        LlavaNextImageProcessor.from_config({**NEXT_PREPROCESSOR, "image_grid_pinpoints": [[28, 50]]})


# --------------------------------------------------------------------------- model
def pixels_of(shapes, seed=0):
    proc = LlavaNextImageProcessor.from_config(NEXT_PREPROCESSOR)
    return [proc(image(w, h, seed)) for w, h in shapes]


def ref_inputs(pixels):
    """transformers' batched form: tiles padded to the most tiles, sizes as (height, width)."""
    most = max(p.tiles.shape[0] for p in pixels)
    padded = torch.zeros(len(pixels), most, 3, IMAGE, IMAGE)
    for i, p in enumerate(pixels):
        padded[i, :p.tiles.shape[0]] = p.tiles
    return {"pixel_values": padded, "image_sizes": torch.tensor([p.image_size for p in pixels])}


@torch.inference_mode()
def ref_features(ref, pixels):
    return ref.model.get_image_features(vision_feature_layer=-2, vision_feature_select_strategy="default",
                                        **ref_inputs(pixels)).pooler_output


def test_packed_image_features_match_reference(loaded):
    """Every tile of every image through the tower at once, then unpadded and packed per
    image: each image's rows equal the reference's and number tokens_for(image)."""
    model, ref, _ = loaded
    pixels = pixels_of(SHAPES)
    spans = [FeatureSpan(start=0, length=0, content_hash=b"", data=p) for p in pixels]
    with torch.inference_mode():
        ours = model.encode_features(spans)
    theirs = ref_features(ref, pixels)
    for p, o, t in zip(pixels, ours, theirs):
        assert o.shape == t.shape == (model.tokens_for(*p.image_size), 64)
        assert max_rel_err(o, t) <= TOL


def prompt_with_images(image_token, pixels, text_ids, counts):
    ids, spans = list(text_ids[:3]), []
    for k, (px, n) in enumerate(zip(pixels, counts)):
        spans.append(FeatureSpan(start=len(ids), length=n, content_hash=bytes([k]), data=px))
        ids += [image_token] * n + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


@torch.inference_mode()
def ref_logits(ref, ids, pixels):
    kw = ref_inputs(pixels) if pixels else {}
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


@torch.inference_mode()
def ref_logits_spans(ref, ids, feats, spans):
    """The reference's image features (``ref_features``) put on the prompt's spans only: a
    generated image token id is plain text."""
    h = ref.get_input_embeddings()(torch.tensor([ids]))
    if feats:
        for (start, n), f in zip(spans, feats):
            h[0, start:start + n] = f
    return ref(inputs_embeds=h).logits[0].float()


IMAGE_SETS = {0: [], 1: [(50, 23)], 2: [(20, 61), (9, 13)]}


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(loaded, n_images):
    model, ref, image_token = loaded
    g = torch.Generator().manual_seed(n_images)
    pixels = pixels_of(IMAGE_SETS[n_images], seed=n_images)
    text = torch.randint(0, image_token, (9,), generator=g).tolist()
    counts = [model.tokens_for(*p.image_size) for p in pixels]
    ids, spans = prompt_with_images(image_token, pixels, text, counts)
    run = OneSequence(model, num_blocks=128)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, pixels))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % image_token)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq, pixels)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"

    run, seq, ours, theirs = OneSequence(model, num_blocks=128), list(ids), [], []
    logits = run.step(ids, spans)[-1]
    for _ in range(10):
        t = int(logits.argmax())
        ours.append(t)
        logits = run.step([t])[-1]
    where, feats = [(s.start, s.length) for s in spans], ref_features(ref, pixels) if pixels else []
    for _ in range(10):
        theirs.append(int(ref_logits_spans(ref, seq, feats, where)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


def test_mistral_text_backbone(tmp_path):
    out, ref, image_token = write_tiny_llava_next(tmp_path, text="mistral")
    model, _ = build_text_model(out, kind="vision")
    pixels = pixels_of([(37, 29)], seed=3)
    text = list(range(1, 10))
    ids, spans = prompt_with_images(image_token, pixels, text, [model.tokens_for(*pixels[0].image_size)])
    assert max_rel_err(OneSequence(model, num_blocks=128).step(ids, spans), ref_logits(ref, ids, pixels)) <= TOL


@pytest.mark.parametrize("layout", ["hub", "renamed"])
def test_checkpoint_layouts_load(tmp_path, loaded, layout):
    """llava-v1.6 hub checkpoints nest the tower under ``vision_tower.vision_model.`` with a
    top-level ``image_newline``; transformers >= 4.52 saves everything under ``model.``."""
    from safetensors.torch import load_file, save_file
    model, _, _ = loaded
    out, _, _ = write_tiny_llava_next(tmp_path)
    weights = load_file(str(out / "model.safetensors"))
    if layout == "hub":
        renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    else:
        renamed = {("lm_head." + k[len("language_model.lm_head."):] if k.startswith("language_model.lm_head.")
                    else "model." + k.replace("language_model.model.", "language_model.", 1)): v
                   for k, v in weights.items()}
        assert "model.image_newline" in renamed and "lm_head.weight" in renamed
    save_file(renamed, str(out / "model.safetensors"))
    other, _ = build_text_model(out, kind="vision")
    assert torch.equal(other.image_newline, model.image_newline)
    spans = [FeatureSpan(start=0, length=0, content_hash=b"", data=p) for p in pixels_of([(37, 29)])]
    with torch.inference_mode():
        assert torch.equal(other.encode_features(spans)[0], model.encode_features(spans)[0])
        ids = torch.arange(5)
        assert torch.equal(other.compute_logits(other.embed(ids)), model.compute_logits(model.embed(ids)))


def test_full_feature_strategy_is_refused(tmp_path):
    import json
    out, _, _ = write_tiny_llava_next(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vision_feature_select_strategy: 'full'"):
        build_text_model(out, kind="vision")


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.LLaVaNext, dtype="F32"),
               pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


def check_against_reference(pipe, ref, req, res, n=6):
    # The reference's tower runs once per request, not once per generated token.
    return vision_testing.check_against_reference(pipe, partial(ref_logits_spans, ref), req, res, n,
                                                  prepare=lambda px: ref_features(ref, px) if px else [])


def test_runner_batches_image_and_text_requests(runner, tiny):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, image_token = tiny
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(image(37, 29, 1)), png_data_uri(image(20, 61, 2))
    reqs = mixed_requests(url_a, url_b)
    steps = pipe.engine.stats["steps"]
    results = run_concurrently(runner, reqs)
    prompts = [check_against_reference(pipe, ref, q, r) for q, r in zip(reqs, results)]
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    for p in prompts:
        # Each image's own count: the two images differ in size and so in tokens.
        counts = [anyres_token_count(*s.data.image_size, PINPOINTS, IMAGE, PER_SIDE) for s in p.spans]
        assert [s.length for s in p.spans] == counts
        assert p.ids.count(image_token) == sum(counts)
    assert prompts[2].spans[0].length != prompts[2].spans[1].length
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_runner_chunked_prefill_splits_an_image_span(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 16                # chunks end inside the image's span
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(image(50, 23, 7))}}])
        steps = pipe.engine.stats["steps"]
        prompt = check_against_reference(pipe, ref, req, runner.send_chat_completion_request(req))
        assert prompt.spans[0].start % 16 != 0 and prompt.spans[0].length > 16
        assert pipe.engine.stats["steps"] - steps >= len(prompt.ids) // 16
    finally:
        sched.max_batch_tokens = old
