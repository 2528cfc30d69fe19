"""Llama 4 against transformers (tiny, every parameter perturbed): the MoE text decoder with
chunked attention on rope layers, L2 q/k norm, NoPE layers with temperature tuning (prompts
longer than the chunk, decode steps crossing chunk borders); the vision tower on tiles."""
import pytest
import torch

from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_llama4 import IMAGE, PATCH, write_tiny_llama4  # noqa: E402
from vision_testing import chat, mixed_requests, OneSequence, png_data_uri, run_concurrently  # noqa: E402

COVERS = ["Llama4"]
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama4(tmp_path_factory.mktemp("tiny_llama4"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


@torch.inference_mode()
def ref_embeds_logits(ref, ids, spans=()):
    h = ref.get_input_embeddings()(torch.tensor([ids]))
    for s in spans:
        feats = ref.get_image_features(pixel_values=s.data.tiles).pooler_output.reshape(-1, h.shape[-1])
        at = [s.start + i for i, t in enumerate(s.data.token_ids) if t == ref.config.image_token_index]
        h[0, at] = feats
    return ref(inputs_embeds=h).logits[0].float()


def test_text_prefill_and_decode_match_reference(loaded):
    model, ref, ids_of = loaded
    vocab = min(ids_of.values())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (13,), generator=g).tolist()      # > 2 chunks of 5
    run = OneSequence(model)
    worst = max_rel_err(run.step(ids), ref_embeds_logits(ref, ids))
    seq = list(ids)
    for i in range(6):                                              # crosses the chunk border at 15
        seq.append((seq[-1] * 7 + 3 + i) % vocab)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_embeds_logits(ref, seq)[-1]))
    assert worst <= TOL, f"relative logit error {worst:.2e}"


def test_text_chunked_prefill_matches_reference(loaded):
    """The prompt in uneven pieces through the cache (queries at non-zero starts)."""
    model, ref, ids_of = loaded
    vocab = min(ids_of.values())
    ids = torch.randint(0, vocab, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    run, outs = OneSequence(model), []
    for a, b in ((0, 3), (3, 11), (11, 17)):
        outs.append(run.step(ids[a:b]))
    assert max_rel_err(torch.cat(outs), ref_embeds_logits(ref, ids)) <= TOL


def test_text_greedy_matches_reference(loaded):
    model, ref, ids_of = loaded
    vocab = min(ids_of.values())
    ids = torch.randint(0, vocab, (8,), generator=torch.Generator().manual_seed(2)).tolist()
    run, ours, seq, theirs = OneSequence(model), [], list(ids), []
    logits = run.step(ids)[-1]
    for _ in range(10):
        ours.append(int(logits.argmax()))
        logits = run.step([ours[-1]])[-1]
    for _ in range(10):
        theirs.append(int(ref_embeds_logits(ref, seq)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


# --------------------------------------------------------------------------- tower + projector
def test_image_features_match_reference(loaded):
    model, ref, _ = loaded
    tiles = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model.image_features(tiles)
        theirs = ref.get_image_features(pixel_values=tiles).pooler_output
    assert model.vision_model.cfg.tokens_per_tile == 4 and theirs.shape == (3, 4, 64)
    assert max_rel_err(ours, theirs.reshape(-1, 64)) <= TOL


def test_tower_hidden_states_match_reference(loaded):
    """Before the adapter: the encoder with its 2-D rope and the class token."""
    model, ref, _ = loaded
    tiles = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    seen = {}
    hook = ref.vision_model.vision_adapter.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    with torch.inference_mode():
        ref.vision_model(tiles)
        mine = {}
        h = model.vision_model.vision_adapter.register_forward_hook(lambda m, a, o: mine.update(x=a[0]))
        model.vision_model(tiles)
    hook.remove(), h.remove()
    assert max_rel_err(mine["x"], seen["x"]) <= TOL


# --------------------------------------------------------------------------- processor
def stub_torchvision(monkeypatch):
    """transformers' Llama 4 modules import torchvision's functional API at the top (absent
    here); the canvas / layout functions tested below do not use it, so an empty stand-in
    lets the modules import. transformers is imported first so its own availability checks
    are already done."""
    import importlib
    import sys
    import types
    import transformers.image_processing_backends  # noqa: F401
    import transformers.image_transforms  # noqa: F401
    import transformers.processing_utils  # noqa: F401
    fn = types.ModuleType("torchvision.transforms.v2.functional")
    fn.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", LANCZOS="lanczos", BICUBIC="bicubic")
    v2 = types.ModuleType("torchvision.transforms.v2")
    v2.functional = fn
    tr = types.ModuleType("torchvision.transforms")
    tr.v2 = v2
    tv = types.ModuleType("torchvision")
    tv.transforms = tr
    for name, mod in (("torchvision", tv), ("torchvision.transforms", tr), ("torchvision.transforms.v2", v2),
                      ("torchvision.transforms.v2.functional", fn)):
        monkeypatch.setitem(sys.modules, name, mod)
    mods = []
    for name in ("transformers.models.llama4.image_processing_llama4", "transformers.models.llama4.processing_llama4"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        mods.append(importlib.import_module(name))
        monkeypatch.delitem(sys.modules, name)
    return mods


def image(width, height, seed=0, mode="RGB"):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([arr, rng.integers(0, 256, (height, width), dtype=np.uint8)]), "RGBA")
    return Image.fromarray(arr, "RGB").convert(mode)


SHAPES = {"tall": (10, 50), "wide": (70, 12), "small": (5, 7), "large_square": (60, 60), "exact": (32, 16),
          "odd": (33, 47), "one_tile": (16, 16), "rgba": (21, 9), "grey": (40, 31)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_processor_matches_reference_steps(name, monkeypatch):
    """Canvas choice, fitted size, tiling order, thumbnail and the bfloat16 normalisation
    through transformers' own functions; the prompt layout through ``_prompt_split_image``.
    The resize itself is torchvision's (not installed here): both sides use torch's uint8
    antialiased bilinear kernel, which is what torchvision calls for uint8 CPU tensors."""
    import types

    import torch.nn.functional as F
    from transformers.image_transforms import split_to_tiles
    from transformers.image_utils import SizeDict
    from tiny_llama4 import MAX_PATCHES, PREPROCESSOR
    from mistralrs_arch_vision.llama4 import Llama4Processor
    from mistralrs_arch_vision.processors.llama4 import Llama4ImageProcessor
    ip, pp = stub_torchvision(monkeypatch)
    w, h = SHAPES[name]
    img = image(w, h, seed=len(name), mode={"rgba": "RGBA", "grey": "L"}.get(name, "RGB"))
    ours, (rows, cols) = Llama4ImageProcessor.from_config(PREPROCESSOR)(img)

    size = SizeDict(height=IMAGE, width=IMAGE)
    res = torch.tensor(ip.find_supported_resolutions(max_num_chunks=MAX_PATCHES, patch_size=size))
    target = ip.get_best_fit((h, w), res, resize_to_max_canvas=False)
    fit = ip.get_max_res_without_distortion((h, w), (min(max(h, IMAGE), target[0]), min(max(w, IMAGE), target[1])))
    fit = (max(int(fit[0]), 1), max(int(fit[1]), 1))
    px = torch.from_numpy(__import__("numpy").asarray(img.convert("RGB")).copy()).permute(2, 0, 1)[None]
    canvas = F.pad(F.interpolate(px, size=fit, mode="bilinear", antialias=True),
                   (0, int(target[1]) - fit[1], 0, int(target[0]) - fit[0]))

    def norm(x):   # the reference's rescale_and_normalize: bfloat16, then tvF.normalize
        x = x.to(torch.bfloat16) * PREPROCESSOR["rescale_factor"]
        return x.sub(torch.tensor([0.5] * 3, dtype=torch.bfloat16).view(-1, 1, 1)).div(
            torch.tensor([0.5] * 3, dtype=torch.bfloat16).view(-1, 1, 1))
    rh, rw = int(target[0]) // IMAGE, int(target[1]) // IMAGE
    want = split_to_tiles(norm(canvas), rh, rw)[0]
    if rh * rw > 1:
        want = torch.cat([want, norm(F.interpolate(px, size=(IMAGE, IMAGE), mode="bilinear", antialias=True))])
    assert (rows, cols) == (rh, rw)
    assert ours.shape == want.shape and torch.equal(ours, want.float())

    names = dict(enumerate(["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                            "<|tile_x_separator|>", "<|tile_y_separator|>"], start=1))
    keys = ["start_of_image_token", "end_of_image_token", "image_token", "patch_token", "tile_x_separator_token",
            "tile_y_separator_token"]
    proc = Llama4Processor(Llama4ImageProcessor.from_config(PREPROCESSOR), 4, {k: i + 1 for i, k in enumerate(keys)})
    prepared = proc.prepare(img)
    stub = types.SimpleNamespace(patch_size=PATCH, downsample_ratio=4)
    stub._prompt_split_image = lambda a, n: pp.Llama4Processor._prompt_split_image(stub, a, n)
    text = pp.Llama4Processor.replace_image_token(stub, {"pixel_values": [want], "aspect_ratios": [(rh, rw)]}, 0)
    assert "".join(names[t] for t in prepared.token_ids) == text
    assert prepared.num_tokens == len(prepared.token_ids)
    assert prepared.token_ids.count(4) == 4 * want.shape[0]


# --------------------------------------------------------------------------- logits with images
def processor_for(model, tiny):
    import types as _t
    from tiny_llama4 import PREPROCESSOR
    from mistralrs_arch_vision.llama4 import Llama4Processor
    out, _, ids_of = tiny
    return Llama4Processor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                           tokenizer=_t.SimpleNamespace(token_to_id=ids_of.get), model_dir=out)


def build_prompt(proc, images, text_ids):
    from mistralrs_core.engine.step import FeatureSpan
    ids, spans = list(text_ids[:3]), []
    for k, img in enumerate(images):
        p = proc.prepare(img)
        spans.append(FeatureSpan(start=len(ids), length=p.num_tokens, content_hash=bytes([k]), data=p.data))
        ids += list(p.token_ids) + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


@torch.inference_mode()
def ref_logits(ref, ids, spans):
    """transformers' own forward: it places the tiles' features on every <|patch|> id."""
    kw = {"pixel_values": torch.cat([s.data.tiles for s in spans])} if spans else {}
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


@pytest.mark.parametrize("n_images", [1, 2])
def test_prefill_and_decode_logits_with_images_match_reference(tiny, loaded, n_images):
    model, ref, ids_of = loaded
    proc = processor_for(model, tiny)
    vocab = min(ids_of.values())
    images = [image(40, 20, seed=1), image(10, 12, seed=2)][:n_images]      # 1 x 2 tiles + thumb; 1 tile
    text = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(n_images)).tolist()
    ids, spans = build_prompt(proc, images, text)
    if n_images == 2:
        assert spans[0].data.tiles.shape[0] != spans[1].data.tiles.shape[0]
    run = OneSequence(model)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, spans))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % vocab)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_embeds_logits(ref, seq, spans)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"

    run, seq, ours, theirs = OneSequence(model), list(ids), [], []
    logits = run.step(ids, spans)[-1]
    for _ in range(8):
        ours.append(int(logits.argmax()))
        logits = run.step([ours[-1]])[-1]
    for _ in range(8):
        theirs.append(int(ref_embeds_logits(ref, seq, spans)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Llama4, dtype="F32"),
               pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


@torch.inference_mode()
def ref_greedy(ref, ids, spans, n):
    ids, toks, lps = list(ids), [], []
    for _ in range(n):
        lp = torch.log_softmax(ref_embeds_logits(ref, ids, spans)[-1].double(), -1)
        toks.append(int(lp.argmax()))
        lps.append(float(lp[toks[-1]]))
        ids.append(toks[-1])
    return toks, lps


def test_runner_batches_image_and_text_requests(runner, tiny):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, ids_of = tiny
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(image(40, 20, seed=5)), png_data_uri(image(12, 45, seed=6))
    reqs = mixed_requests(url_a, url_b)
    steps = pipe.engine.stats["steps"]
    results = run_concurrently(runner, reqs)
    prompts = []
    for q, res in zip(reqs, results):
        prompt = pipe.chat_prompt(q)
        want_toks, want_lps = ref_greedy(ref, prompt.ids, prompt.spans, 6)
        assert res.usage.prompt_tokens == len(prompt.ids)
        assert [e.logprob for e in res.choices[0].logprobs.content] == pytest.approx(want_lps, abs=1e-4)
        assert res.choices[0].message.content == pipe.tokenizer.decode(want_toks)
        prompts.append(prompt)
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    # url_a: 40 x 20 -> a 1 x 2 tile canvas: two 4-token tiles, a separator, the row end,
    # then <|image|> and the thumbnail's 4 tokens.
    a, i = prompts[0].spans[0], ids_of
    assert prompts[0].ids[a.start:a.end] == ([i["<|image_start|>"]] + [i["<|patch|>"]] * 4 + [i["<|tile_x_separator|>"]]
                                             + [i["<|patch|>"]] * 4 + [i["<|tile_y_separator|>"], i["<|image|>"]]
                                             + [i["<|patch|>"]] * 4 + [i["<|image_end|>"]])
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_runner_chunked_prefill_splits_inside_an_image(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 5
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(image(40, 40, seed=8))}}])
        res = runner.send_chat_completion_request(req)
        prompt = pipe.chat_prompt(req)
        _, want_lps = ref_greedy(ref, prompt.ids, prompt.spans, 6)
        assert [e.logprob for e in res.choices[0].logprobs.content] == pytest.approx(want_lps, abs=1e-4)
        assert prompt.spans[0].length > 10
    finally:
        sched.max_batch_tokens = old


# --------------------------------------------------------------------------- text variants
VARIANTS = {
    # Scout's rope scaling, no q/k norm (the 128-expert model), every layer sparse, top-2
    "llama3_rope_no_qk_norm_top2": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                         "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 16},
                                        use_qk_norm=False, interleave_moe_layer_step=1, num_experts_per_tok=2),
    # no chunking, no temperature tuning, NoPE every third layer
    "full_attention_no_tuning": dict(attention_chunk_size=None, attn_temperature_tuning=False,
                                     no_rope_layer_interval=3),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_text_variants_match_reference(tmp_path, name):
    out, ref, ids_of = write_tiny_llama4(tmp_path, **VARIANTS[name])
    model, _ = build_text_model(out, kind="vision")
    vocab = min(ids_of.values())
    ids = torch.randint(0, vocab, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    run = OneSequence(model)
    worst = max_rel_err(run.step(ids), ref_embeds_logits(ref, ids))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 5 + 1 + i) % vocab)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_embeds_logits(ref, seq)[-1]))
    assert worst <= TOL, f"{name}: relative logit error {worst:.2e}"


def test_processor_errors_are_clear(loaded, tiny):
    import types as _t
    from tiny_llama4 import PREPROCESSOR
    from mistralrs_arch_vision.llama4 import Llama4Processor
    model, _, ids_of = loaded
    out = tiny[0]

    def make(tok=ids_of.get, pre=PREPROCESSOR):
        return Llama4Processor.from_pretrained(model=model, hf_config={}, preprocessor_config=pre,
                                               tokenizer=_t.SimpleNamespace(token_to_id=tok), model_dir=out)
    with pytest.raises(ValueError, match=r"no '<\|tile_x_separator\|>' token"):
        make(tok=lambda t: None if t == "<|tile_x_separator|>" else ids_of.get(t))
    with pytest.raises(ValueError, match="tile size 32 differs"):
        make(pre=dict(PREPROCESSOR, size={"height": 32, "width": 32}))
    with pytest.raises(ValueError, match="always resizes"):
        make(pre=dict(PREPROCESSOR, do_resize=False))
    assert make().image_token_id == ids_of["<|image|>"]
