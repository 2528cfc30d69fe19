"""Mistral 3 against transformers (tiny, every parameter perturbed): the Pixtral tower on a
batch of differently sized images, the processor against ``PixtralImageProcessorPil`` and
``PixtralProcessor``'s token layout, prefill + cached decode logits with 0, 1 and 2 images of
different sizes, greedy tokens; then the Runner (``Which.VisionPlain``), an image request
batched with a text request."""
import types

import numpy as np
import pytest
import torch
from PIL import Image

from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from vision_testing import chat, mixed_requests, OneSequence, png_data_uri, run_concurrently  # noqa: E402
from tiny_mistral3 import LONGEST, PATCH, PREPROCESSOR, UNIT, write_tiny_mistral3  # noqa: E402

from mistralrs_arch_vision.mistral3 import Mistral3Processor  # noqa: E402
from mistralrs_arch_vision.processors.pixtral import PixtralImageProcessor  # noqa: E402

COVERS = ["Mistral3"]
TOL = 1e-4


def image(width, height, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([arr, rng.integers(0, 256, (height, width), dtype=np.uint8)]), "RGBA")
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_mistral3(tmp_path_factory.mktemp("tiny_mistral3"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


def padded_batch(pixels):
    """The reference's input: images zero-padded to the largest, plus their sizes."""
    h, w = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
    px = torch.zeros(len(pixels), 3, h, w)
    for i, p in enumerate(pixels):
        px[i, :, :p.shape[1], :p.shape[2]] = p
    return px, torch.tensor([list(p.shape[1:]) for p in pixels])


# --------------------------------------------------------------------------- tower + projector
@pytest.mark.parametrize("layer", [-1, 0, -2])
def test_tower_on_images_of_two_sizes_matches_reference(tiny, layer):
    from mistralrs_arch_vision.towers.pixtral import PixtralTowerConfig, PixtralVisionTower
    from mistralrs_core.loading.weights import load_module
    out, ref, _ = tiny
    vc = ref.config.vision_config.to_dict()
    tower = PixtralVisionTower(PixtralTowerConfig.from_hf(vc), [layer])
    sd = {k: v for k, v in ref.model.vision_tower.state_dict().items() if tower.keeps_weight(k)}
    load_module(tower, sd.items(), dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(3)
    pixels = [torch.randn(3, 12, 20, generator=g), torch.randn(3, 28, 8, generator=g)]
    with torch.inference_mode():
        ours, grids = tower(pixels)
        px, sizes = padded_batch(pixels)
        theirs = ref.model.vision_tower(px, image_sizes=sizes, output_hidden_states=True).hidden_states[layer][0]
    assert grids == [(3, 5), (7, 2)]
    assert ours.shape == theirs.shape == (15 + 14, 32)
    assert max_rel_err(ours, theirs) <= TOL


def test_image_features_match_reference(loaded):
    model, ref, _ = loaded
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(3, 16, 24, generator=g), torch.randn(3, 40, 8, generator=g), torch.randn(3, 8, 8, generator=g)]
    with torch.inference_mode():
        ours = model.image_features(pixels)
        px, sizes = padded_batch(pixels)
        theirs = ref.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output
    assert [o.shape[0] for o in ours] == [6, 5, 1]
    for o, t in zip(ours, theirs):
        assert max_rel_err(o, t) <= TOL


def test_several_feature_layers_refused(tmp_path):
    from mistralrs_arch_vision.mistral3 import Mistral3ForConditionalGeneration
    out, ref, _ = write_tiny_mistral3(tmp_path)
    import json
    hf = json.loads((out / "config.json").read_text())
    with pytest.raises(ValueError, match="several layers"):
        Mistral3ForConditionalGeneration.from_hf_config({**hf, "vision_feature_layer": [-1, -2]})


# --------------------------------------------------------------------------- processor
SHAPES = {  # (width, height)
    "tall": (30, 100),
    "wide": (120, 20),
    "small": (5, 7),
    "large_square": (200, 200),
    "exact_units": (40, 16),
    "rgba": (33, 47),
    "grey": (60, 61),
}


def pixtral_processor_class(monkeypatch):
    """transformers' ``PixtralProcessor`` class. Its module imports the torchvision image
    processor only for a size helper, which the PIL module has too: without torchvision that
    module is stood in by the PIL one for the import."""
    import importlib
    import sys
    pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    name = "transformers.models.pixtral.processing_pixtral"
    monkeypatch.setitem(sys.modules, "transformers.models.pixtral.image_processing_pixtral", pil)
    monkeypatch.delitem(sys.modules, name, raising=False)
    cls = importlib.import_module(name).PixtralProcessor
    monkeypatch.delitem(sys.modules, name)
    return cls


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_processor_matches_reference(name, monkeypatch):
    from transformers import PixtralImageProcessorPil
    PixtralProcessor = pixtral_processor_class(monkeypatch)
    w, h = SHAPES[name]
    img = image(w, h, seed=len(name), mode={"rgba": "RGBA", "grey": "L"}.get(name, "RGB"))
    # PixtralProcessor hands its image processor patch_size = patch * spatial merge.
    ref = PixtralImageProcessorPil.from_dict(dict(PREPROCESSOR, patch_size={"height": UNIT, "width": UNIT}))
    want = ref([img], return_tensors="pt")
    ours = PixtralImageProcessor.from_config(PREPROCESSOR, UNIT)(img)
    rh, rw = want["image_sizes"][0].tolist()
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (3, rh, rw)
    assert torch.equal(ours, want["pixel_values"][0, :, :rh, :rw])
    assert max(rh, rw) <= LONGEST + UNIT and rh % UNIT == 0 and rw % UNIT == 0

    # The prompt layout: PixtralProcessor's own expansion (an instance needs torchvision, so
    # its method runs on a stand-in holding the attributes it reads).
    stub = types.SimpleNamespace(patch_size=PATCH, spatial_merge_size=UNIT // PATCH, image_token="[IMG]",
                                 image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    text = PixtralProcessor.replace_image_token(stub, {"image_sizes": [(rh, rw)]}, 0)
    names = {1: "[IMG]", 2: "[IMG_BREAK]", 3: "[IMG_END]"}
    proc = Mistral3Processor(PixtralImageProcessor.from_config(PREPROCESSOR, UNIT), 1, 2, 3)
    prepared = proc.prepare(img)
    assert "".join(names[t] for t in prepared.token_ids) == text
    assert prepared.num_tokens == len(prepared.token_ids) == (rh // UNIT) * (rw // UNIT + 1)
    assert torch.equal(prepared.data.pixels, ours)


def test_processor_errors_are_clear(loaded, tiny):
    model, _, ids_of = loaded
    out = tiny[0]
    no_break = types.SimpleNamespace(token_to_id=lambda t: None if t == "[IMG_BREAK]" else ids_of.get(t))
    with pytest.raises(ValueError, match=r"no '\[IMG_BREAK\]' token"):
        Mistral3Processor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                          tokenizer=no_break, model_dir=out)
    fixed = PixtralImageProcessor.from_config(dict(PREPROCESSOR, do_resize=False), UNIT)
    assert fixed(image(16, 24)).shape == (3, 24, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        fixed(image(17, 24))


# --------------------------------------------------------------------------- logits
def build_prompt(pipe_proc, images, text_ids):
    """text, then each image's expansion followed by more text (what the pipeline builds)."""
    from mistralrs_core.engine.step import FeatureSpan
    ids, spans = list(text_ids[:3]), []
    for k, img in enumerate(images):
        p = pipe_proc.prepare(img)
        spans.append(FeatureSpan(start=len(ids), length=p.num_tokens, content_hash=bytes([k]), data=p.data))
        ids += list(p.token_ids) + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


@torch.inference_mode()
def ref_logits_spans(ref, ids, spans, image_token):
    """The reference, image features placed on the prompt spans' [IMG] rows only: a random
    model may generate the image token id, which then is an ordinary token."""
    h = ref.get_input_embeddings()(torch.tensor([ids]))
    if spans:
        px, sizes = padded_batch([s.data.pixels for s in spans])
        feats = ref.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output
        for s, f in zip(spans, feats):
            at = [s.start + i for i, t in enumerate(s.data.token_ids) if t == image_token]
            h[0, at] = f
    return ref(inputs_embeds=h).logits[0].float()


@torch.inference_mode()
def ref_logits(ref, ids, spans):
    kw = {}
    if spans:
        kw["pixel_values"], kw["image_sizes"] = padded_batch([s.data.pixels for s in spans])
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(tiny, loaded, n_images):
    out, _, ids_of = tiny
    model, ref, _ = loaded
    img_tok = ids_of["[IMG]"]
    proc = Mistral3Processor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                             tokenizer=types.SimpleNamespace(token_to_id=ids_of.get),
                                             model_dir=out)
    g = torch.Generator().manual_seed(n_images)
    images = [image(50, 20, seed=1), image(13, 30, seed=2)][:n_images]
    text = torch.randint(0, img_tok, (9,), generator=g).tolist()
    ids, spans = build_prompt(proc, images, text)
    if n_images == 2:
        assert spans[0].length != spans[1].length             # different sizes
    run = OneSequence(model)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, spans))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % img_tok)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq, spans)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"

    run, seq, ours, theirs = OneSequence(model), list(ids), [], []
    logits = run.step(ids, spans)[-1]
    for _ in range(10):
        t = int(logits.argmax())
        ours.append(t)
        logits = run.step([t])[-1]
    for _ in range(10):
        theirs.append(int(ref_logits_spans(ref, seq, spans, img_tok)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


def test_sliding_window_text_matches_reference(tmp_path):
    """Mistral text with a sliding window shorter than the prompt."""
    out, ref, ids_of = write_tiny_mistral3(tmp_path, sliding_window=8)
    model, _ = build_text_model(out, kind="vision")
    assert model.cfg.sliding_window == 8
    proc = Mistral3Processor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                             tokenizer=types.SimpleNamespace(token_to_id=ids_of.get),
                                             model_dir=out)
    text = torch.randint(0, ids_of["[IMG]"], (9,), generator=torch.Generator().manual_seed(9)).tolist()
    ids, spans = build_prompt(proc, [image(24, 24, seed=4)], text)
    assert max_rel_err(OneSequence(model).step(ids, spans), ref_logits(ref, ids, spans)) <= TOL


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Mistral3, dtype="F32"),
               pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


@torch.inference_mode()
def ref_greedy(ref, ids, spans, image_token, n):
    ids, toks, lps = list(ids), [], []
    for _ in range(n):
        lp = torch.log_softmax(ref_logits_spans(ref, ids, spans, image_token)[-1].double(), -1)
        t = int(lp.argmax())
        toks.append(t)
        lps.append(float(lp[t]))
        ids.append(t)
    return toks, lps


def test_runner_batches_image_and_text_requests(runner, tiny):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, ids_of = tiny
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(image(70, 30, seed=5)), png_data_uri(image(20, 45, seed=6))
    reqs = mixed_requests(url_a, url_b)
    steps = pipe.engine.stats["steps"]
    results = run_concurrently(runner, reqs)
    prompts = []
    for q, res in zip(reqs, results):
        prompt = pipe.chat_prompt(q)
        want_toks, want_lps = ref_greedy(ref, prompt.ids, prompt.spans, ids_of["[IMG]"], 6)
        assert res.usage.prompt_tokens == len(prompt.ids)
        assert [e.logprob for e in res.choices[0].logprobs.content] == pytest.approx(want_lps, abs=1e-4)
        assert res.choices[0].message.content == pipe.tokenizer.decode(want_toks)
        prompts.append(prompt)
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    # url_a: 70 x 30 -> resized 48 x 21 -> 6 x 3 tokens, 3 rows with a break or end each.
    a = prompts[0].spans[0]
    assert prompts[0].ids[a.start:a.end] == ([ids_of["[IMG]"]] * 6 + [ids_of["[IMG_BREAK]"]]) * 2 + \
        [ids_of["[IMG]"]] * 6 + [ids_of["[IMG_END]"]]
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_runner_chunked_prefill_splits_inside_an_image(runner, tiny):
    """Chunks that end inside the span, between breaks: the span's rows are sliced."""
    _, ref, ids_of = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 5
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(image(40, 40, seed=8))}}])
        res = runner.send_chat_completion_request(req)
        prompt = pipe.chat_prompt(req)
        _, want_lps = ref_greedy(ref, prompt.ids, prompt.spans, ids_of["[IMG]"], 6)
        assert [e.logprob for e in res.choices[0].logprobs.content] == pytest.approx(want_lps, abs=1e-4)
        assert prompt.spans[0].length > 10
    finally:
        sched.max_batch_tokens = old
