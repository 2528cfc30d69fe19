"""MiniCPM-o 2.6 against a reference built from transformers parts (``Qwen2ForCausalLM``,
``Idefics2VisionTransformer``) plus the hub's resampler and vision position ids written in
``tiny_minicpmo.py`` (tiny, every parameter perturbed): slice features of images of several
shapes, prefill + cached decode logits with 0, 1 and 2 (sliced) images, greedy tokens; the
processor (pieces, pixels, target sizes, placeholder text) against the hub's slicing algorithm
written below from ``image_processing_minicpmv.py``; bad inputs; then the model through the
Runner (``Which.VisionPlain``), an image request batched with a text one."""

import math
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_minicpmo import (IMAGE, PATCH, PREPROCESSOR, QUERIES, TEXT_HIDDEN, hub_position_ids_ref,  # noqa: E402
                           sincos_2d_ref, write_tiny_minicpmo)
import vision_testing  # noqa: E402
from vision_testing import chat, png_data_uri, random_image, run_concurrently  # noqa: E402

COVERS = ["MiniCpmO"]
TOL = 1e-4
TAG = "(<image>./</image>)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_minicpmo(tmp_path_factory.mktemp("tiny_minicpmo"))


@pytest.fixture(scope="module")
def loaded(tiny):
    from mistralrs_core.loading.model_loader import build_text_model
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


def processor_for(model, out, **overrides):
    from mistralrs_arch_vision.minicpmo import MiniCpmOProcessor
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    return MiniCpmOProcessor.from_pretrained(model=model, hf_config={}, tokenizer=Tokenizer.from_dir(out),
                                             preprocessor_config={**PREPROCESSOR, **overrides})


def loaded_image(seed, size):
    from mistralrs_arch_vision.inputs import load_image
    return load_image(png_data_uri(random_image(seed, size)), where="x")


# (W, H): tall, wide, smaller than one slice, square, large (many slices), smaller than a patch grid.
SHAPES = {"tall": (14, 40), "wide": (40, 18), "small": (9, 7), "square": (24, 24), "large": (61, 30),
          "tiny": (3, 2)}


# --------------------------------------------------------------------------- the vision side
def test_slice_features_match_reference(loaded):
    """Source images and slices of several patch grids in one call equal the reference (each
    slice alone through the tower, the resampler over a padded batch)."""
    from mistralrs_arch_vision.processors.minicpmo import MiniCpmImageProcessor
    model, ref, _ = loaded
    ip = MiniCpmImageProcessor.from_hf(PREPROCESSOR)
    pieces = [p for k, size in enumerate(SHAPES.values()) for p in ip(random_image(k, size))]
    assert len({p.tgt_size for p in pieces}) >= 5
    with torch.inference_mode():
        ours = model.slice_features(pieces)
    theirs = ref.slice_features([(p.pixels, p.tgt_size) for p in pieces])
    assert [tuple(f.shape) for f in ours] == [(QUERIES, TEXT_HIDDEN)] * len(pieces)
    assert max(max_rel_err(a, b) for a, b in zip(ours, theirs)) <= TOL
    # Alone a slice reads as in a padded batch, and in smaller tower batches.
    with torch.inference_mode():
        alone = model.slice_features(pieces[-1:])[0]
        model.vision_batch_size = 3
        try:
            chunked = model.slice_features(pieces)
        finally:
            model.vision_batch_size = 16
    assert max_rel_err(alone, ours[-1]) <= TOL
    assert max(max_rel_err(a, b) for a, b in zip(chunked, ours)) <= TOL
    assert max_rel_err(ours[0], ours[1]) > 1e-2


def test_vision_position_ids_follow_the_hub():
    """The hub's arange fractions, not transformers' Idefics2 arithmetic: they differ for some
    grids (a 49-patch side at 70 cells), and the model was trained with the hub's."""
    from mistralrs_arch_vision.minicpmo import hub_position_ids
    from mistralrs_arch_vision.towers.siglip_navit import fractional_position_ids
    for side in (70, IMAGE // PATCH):
        for n in range(1, 71):
            assert torch.equal(hub_position_ids(n, 3, side), hub_position_ids_ref(n, 3, side)), (side, n)
            assert torch.equal(hub_position_ids(2, n, side), hub_position_ids_ref(2, n, side)), (side, n)
    assert not torch.equal(hub_position_ids(1, 49, 70), fractional_position_ids(1, 49, 70))


def test_resampler_positions_equal_the_hub_table():
    from mistralrs_arch_vision.towers.sincos_resampler import sincos_2d
    for h, w in [(1, 1), (3, 7), (7, 3), (32, 32)]:
        want = torch.from_numpy(sincos_2d_ref(TEXT_HIDDEN, h, w)).float()
        assert torch.equal(sincos_2d(TEXT_HIDDEN, h, w), want), (h, w)
    assert not torch.equal(sincos_2d(8, 2, 3)[..., :4], sincos_2d(8, 2, 3)[..., 4:])   # columns then rows


# --------------------------------------------------------------------------- logits
def run_ours(model, ids, spans, decode):
    """Prefill with the spans' features spliced in, then ``decode`` single-token steps;
    returns the prefill logits and each decode step's."""
    from mistralrs_core.engine.model_runner import build_metadata
    from mistralrs_core.engine.step import record
    from mistralrs_core.layers.recurrent import make_layer_cache
    caches = [make_layer_cache(s, 64, 4, model.dtype, "cpu") for s in model.kv_cache_specs()]
    blocks, pos, out = list(range(64)), 0, []
    with torch.inference_mode():
        for step_ids, step_spans in [(ids, spans)] + [([t], ()) for t in decode]:
            rec = record(step_ids, pos, blocks, spans=tuple(step_spans))
            tok, positions, meta = build_metadata([rec], 4, "cpu")
            h = model.embed(tok)
            if step_spans:
                rows = torch.cat([torch.arange(s.start, s.end) for s in step_spans]) - pos
                h = model.merge_features(h, rows, torch.cat(model.encode_features(list(step_spans))))
            pos += len(step_ids)
            out.append(model.compute_logits(model.forward_embeds(h, positions, meta, caches)))
    return out


IMAGE_SETS = {0: [], 1: [("wide", 3)], 2: [("large", 4), ("tall", 5)]}


def build_prompt(model, out, n_images):
    images = [loaded_image(seed, SHAPES[name]) for name, seed in IMAGE_SETS[n_images]]
    text = ("<|im_start|>user\n" + "".join(f"{TAG}\n" for _ in images) + "Describe the Rust type system.<|im_end|>\n"
            "<|im_start|>assistant\n")
    return processor_for(model, out).expand_prompt(text, images)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(loaded, tiny, n_images):
    model, ref, ids_of = loaded
    prompt = build_prompt(model, tiny[0], n_images)
    assert len(prompt.spans) > n_images or n_images == 0      # the images are sliced
    spans = [(s.start, s.length) for s in prompt.spans]
    feats = ref.slice_features([(s.data.pixels, s.data.tgt_size) for s in prompt.spans]) if spans else []
    decode = [(7 * i + 11) % ids_of["<image>"] for i in range(4)]
    got = run_ours(model, list(prompt.ids), list(prompt.spans), decode)
    seq = list(prompt.ids)
    worst = max_rel_err(got[0], ref.logits(seq, feats, spans))
    for t, step in zip(decode, got[1:]):
        seq.append(t)
        worst = max(worst, max_rel_err(step[-1], ref.logits(seq, feats, spans)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"


def test_greedy_32_tokens_match_reference(loaded, tiny):
    model, ref, _ = loaded
    prompt = build_prompt(model, tiny[0], 2)
    spans = [(s.start, s.length) for s in prompt.spans]
    feats = ref.slice_features([(s.data.pixels, s.data.tgt_size) for s in prompt.spans])
    from mistralrs_core.engine.model_runner import build_metadata
    from mistralrs_core.engine.step import record
    from mistralrs_core.layers.recurrent import make_layer_cache
    caches = [make_layer_cache(s, 64, 4, model.dtype, "cpu") for s in model.kv_cache_specs()]
    ours, ids, step_spans, pos = [], list(prompt.ids), list(prompt.spans), 0
    with torch.inference_mode():
        for _ in range(32):
            rec = record(ids, pos, list(range(64)), spans=tuple(step_spans))
            tok, positions, meta = build_metadata([rec], 4, "cpu")
            h = model.embed(tok)
            if step_spans:
                rows = torch.cat([torch.arange(s.start, s.end) for s in step_spans])
                h = model.merge_features(h, rows, torch.cat(model.encode_features(step_spans)))
            pos += len(ids)
            ids = [int(model.compute_logits(model.forward_embeds(h, positions, meta, caches))[-1].argmax())]
            ours.append(ids[0])
            step_spans = []
    seq, theirs = list(prompt.ids), []
    for _ in range(32):
        theirs.append(int(ref.logits(seq, feats, spans)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


def test_checkpoint_names_map_to_every_parameter(loaded):
    """Every parameter came from the checkpoint; the audio/TTS weights it also holds were skipped."""
    model, ref, _ = loaded
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    names = {n for n, _ in model.named_parameters()}
    assert not [n for n in names if n.startswith(("apm", "tts", "audio"))]
    assert torch.equal(model.resampler.proj, ref.resampler.proj.detach())
    assert torch.equal(model.lm_head.weight, ref.llm.lm_head.weight.detach())


def test_minicpm_v_2_6_folder_loads_as_the_same_family(loaded, tiny, tmp_path):
    """MiniCPM-V 2.6 (model_type minicpmv, MiniCPMV) is the same model without audio weights."""
    import json
    import shutil
    from mistralrs_core.loading.model_loader import build_text_model
    from mistralrs_arch_vision.minicpmo import MiniCPMOForConditionalGeneration
    model, _, _ = loaded
    folder = shutil.copytree(tiny[0], tmp_path / "minicpmv")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="minicpmv", architectures=["MiniCPMV"])
    (folder / "config.json").write_text(json.dumps(cfg))
    v, _ = build_text_model(folder, kind="vision")
    assert type(v) is MiniCPMOForConditionalGeneration
    ids = [5, 9, 30, 2]
    assert torch.equal(run_ours(v, ids, [], [])[0], run_ours(model, ids, [], [])[0])


# openbmb/MiniCPM-o-2_6's config.json (the keys that shape the model).
MINICPM_O_2_6 = {
    "architectures": ["MiniCPMO"], "model_type": "minicpmo", "version": 2.6, "hidden_size": 3584,
    "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
    "max_window_layers": 28, "use_sliding_window": False, "tie_word_embeddings": False, "vocab_size": 151700,
    "query_num": 64, "vision_batch_size": 16, "drop_vision_last_layer": False, "init_audio": True, "init_tts": True,
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
}


def test_released_config_reads_like_the_hub():
    from mistralrs_arch_vision.minicpmo import MiniCPMOForConditionalGeneration as M
    with torch.device("meta"):
        model = M.from_hf_config(MINICPM_O_2_6)
    c, ref = model.cfg, transformers.Qwen2Config(**{k: v for k, v in MINICPM_O_2_6.items()
                                                     if k not in ("vision_config", "architectures", "model_type")})
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size,
            c.norm_eps, c.sliding_window, c.tie_word_embeddings) == \
        (ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers, ref.num_attention_heads,
         ref.num_key_value_heads, ref.vocab_size, ref.rms_norm_eps, None, False)
    assert model.resampler.attn.num_heads == 28 and model.resampler.query.shape == (64, 3584)
    assert model.resampler.kv_proj.weight.shape == (3584, 1152)
    assert len(model.vpm.encoder.layers) == 27 and model.vpm.cfg.patches_per_side == 70
    with torch.device("meta"):
        v26 = M.from_hf_config({**MINICPM_O_2_6, "model_type": "minicpmv", "architectures": ["MiniCPMV"],
                                "drop_vision_last_layer": True, "init_audio": None})
    assert len(v26.vpm.encoder.layers) == 26
    assert model.cfg.embed_scale is None
    with torch.device("meta"):
        assert M.from_hf_config({**MINICPM_O_2_6, "scale_emb": 12}).cfg.embed_scale == 12.0
    with pytest.raises(ValueError, match="version 2.5"):
        M.from_hf_config({**MINICPM_O_2_6, "model_type": "minicpmv", "version": 2.5})
    with pytest.raises(ValueError, match="model_type"):
        M.from_hf_config({**MINICPM_O_2_6, "model_type": "qwen2"})


def test_family_imports_no_other_plugin():
    import subprocess
    import sys
    code = ("import sys, mistralrs_arch_vision.minicpmo\n"
            "print(sorted(m for m in sys.modules if m.startswith('mistralrs_arch_text')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": ":".join(p for p in sys.path if p)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- the processor
class HubSlicer:
    """The hub's MiniCPMVImageProcessor algorithm (image_processing_minicpmv.py, 2.6), written
    here from its published code: slicing geometry, bicubic resizes, crops, /255 and
    transformers' ``normalize``, ``unfold`` patch layout, placeholder text."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.s, self.p, self.max = cfg["scale_resolution"], cfg["patch_size"], cfg["max_slice_nums"]

    def ensure_divide(self, length, p):
        return max(round(length / p) * p, p)

    def find_best_resize(self, size, allow_upscale=False):
        width, height = size
        if width * height > self.s * self.s or allow_upscale:
            r = width / height
            height = int(self.s / math.sqrt(r))
            width = int(height * r)
        return self.ensure_divide(width, self.p), self.ensure_divide(height, self.p)

    def get_refine_size(self, size, grid):
        rw, rh = self.ensure_divide(size[0], grid[0]), self.ensure_divide(size[1], grid[1])
        bw, bh = self.find_best_resize((rw / grid[0], rh / grid[1]), allow_upscale=True)
        return bw * grid[0], bh * grid[1]

    def get_sliced_grid(self, size):
        log_ratio = math.log(size[0] / size[1])
        multiple = min(math.ceil(size[0] * size[1] / (self.s * self.s)), self.max)
        if multiple <= 1:
            return None
        nums = [i for i in (multiple - 1, multiple, multiple + 1) if i != 1 and i <= self.max]
        grids = [[m, n // m] for n in nums for m in range(1, n + 1) if n % m == 0]
        best, err = [1, 1], float("inf")
        for g in grids:
            e = abs(log_ratio - math.log(g[0] / g[1]))
            if e < err:
                best, err = g, e
        return best

    def pieces(self, image):
        grid = self.get_sliced_grid(image.size)
        if grid is None:
            return [image.resize(self.find_best_resize(image.size, True), resample=Image.Resampling.BICUBIC)]
        source = image.copy().resize(self.find_best_resize(image.size), resample=Image.Resampling.BICUBIC)
        refine = image.resize(self.get_refine_size(image.size, grid), resample=Image.Resampling.BICUBIC)
        gx, gy = int(refine.width / grid[0]), int(refine.height / grid[1])
        return [source] + [refine.crop((j, i, j + gx, i + gy)) for i in range(0, refine.height, gy)
                           for j in range(0, refine.width, gx)]

    def preprocess(self, image):
        from transformers.image_transforms import normalize
        from transformers.image_utils import ChannelDimension
        out = []
        for piece in self.pieces(image.convert("RGB")):
            x = np.array(piece).astype(np.float32) / 255
            x = normalize(x, self.cfg["norm_mean"], self.cfg["norm_std"], input_data_format=ChannelDimension.LAST)
            x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
            cols = torch.nn.functional.unfold(x, (self.p, self.p), stride=(self.p, self.p))
            layout = cols.reshape(3, self.p, self.p, -1).permute(0, 1, 3, 2).reshape(3, self.p, -1)
            out.append((layout, (x.shape[1] // self.p, x.shape[2] // self.p)))
        return out

    def placeholder(self, size, idx):
        c = self.cfg
        run = c["unk"] * c["image_feature_size"]
        text = c["im_start"] + run + c["im_end"]
        if c["use_image_id"]:
            text = f"{c['im_id_start']}{idx}{c['im_id_end']}" + text
        grid = self.get_sliced_grid(size)
        if grid is not None:
            cell = c["slice_start"] + run + c["slice_end"]
            text += "\n".join("".join([cell] * grid[0]) for _ in range(grid[1]))
        return text


REAL = {**PREPROCESSOR, "scale_resolution": 448, "patch_size": 14, "image_feature_size": 64}


def test_slicing_geometry_matches_hub_at_real_size():
    """Grid, source and refine sizes and placeholder text of the released settings, on sizes
    around every rounding edge (upstream mistral.rs's own geometry cases included)."""
    from mistralrs_arch_vision.processors.minicpmo import MiniCpmImageProcessor, find_best_resize, get_refine_size
    ours, hub = MiniCpmImageProcessor.from_hf(REAL), HubSlicer(REAL)
    sizes = [(896, 448), (448, 896), (1600, 900), (1000, 30), (30, 1000), (449, 448), (448, 448), (2000, 2000),
             (7, 5), (1344, 1344), (3000, 100), (900, 1600), (1023, 767)]
    rng = np.random.default_rng(0)
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(300)]
    for size in sizes:
        grid = ours.grid(size)
        assert grid == (None if hub.get_sliced_grid(size) is None else tuple(hub.get_sliced_grid(size))), size
        assert find_best_resize(size, 448, 14, grid is None) == hub.find_best_resize(size, grid is None), size
        if grid is not None:
            assert get_refine_size(size, grid, 448, 14) == hub.get_refine_size(size, list(grid)), size
        assert ours.placeholder(size, 3) == hub.placeholder(size, 3), size
    assert ours.grid((896, 448)) == (2, 1) and ours.grid((448, 896)) == (1, 2)
    assert find_best_resize((1600, 900), 448, 14) == (602, 336)
    assert get_refine_size((1600, 900), (2, 1), 448, 14) == (840, 476)


@pytest.mark.parametrize("cfg", [PREPROCESSOR, REAL], ids=["tiny", "released"])
def test_pixels_and_target_sizes_match_hub_algorithm(cfg):
    from mistralrs_arch_vision.processors.minicpmo import MiniCpmImageProcessor
    ours, hub = MiniCpmImageProcessor.from_hf(cfg), HubSlicer(cfg)
    shapes = SHAPES.values() if cfg is PREPROCESSOR else [(500, 300), (200, 700), (100, 80)]
    for k, size in enumerate(shapes):
        image = random_image(k, size)
        got, want = ours(image), hub.preprocess(image)
        assert len(got) == len(want), size
        for piece, (layout, tgt) in zip(got, want):
            assert piece.tgt_size == tgt, size
            assert torch.equal(piece.pixels, layout), size


def test_prompt_expansion_places_every_slice(loaded, tiny):
    """The hub's processor's text: each tag expanded as get_slice_image_placeholder does, with
    image ids in prompt order; one span per source image and slice, on its <unk> run, with
    the slice's pixels; digests distinct, the source image keeping the image's."""
    from mistralrs_core.tokenization.prompt import encode_prompt
    model, _, ids_of = loaded
    out = tiny[0]
    proc = processor_for(model, out)
    hub = HubSlicer(PREPROCESSOR)
    images = [loaded_image(k, size) for k, size in enumerate(SHAPES.values())]
    text = "<|im_start|>user\n" + "\n".join(f"{TAG}\nword {k}" for k in range(len(images))) + "<|im_end|>\n"
    got = proc.expand_prompt(text, images)
    chunks = text.split(TAG)
    want_text = chunks[0] + "".join(hub.placeholder(img.image.size, k) + c
                                    for k, (img, c) in enumerate(zip(images, chunks[1:])))
    assert got.ids == encode_prompt(proc.tokenizer, want_text)
    pieces = [p for img in images for p in hub.preprocess(img.image)]
    assert len(got.spans) == len(pieces)
    opens = {ids_of["<image>"], ids_of["<slice>"]}
    closes = {ids_of["</image>"], ids_of["</slice>"]}
    for span, (layout, tgt) in zip(got.spans, pieces):
        assert span.length == QUERIES
        assert got.ids[span.start - 1] in opens and got.ids[span.end] in closes
        assert set(got.ids[span.start:span.end]) == {ids_of["<unk>"]}
        assert torch.equal(span.data.pixels, layout) and span.data.tgt_size == tgt
    hashes = [s.content_hash for s in got.spans]
    assert len(set(hashes)) == len(hashes) and hashes[0] == images[0].content_hash
    # Without image ids and without slicing: one <image> run per image, nothing else.
    plain = processor_for(model, out, use_image_id=False, slice_mode=False)
    got = plain.expand_prompt(text, images)
    assert len(got.spans) == len(images)
    assert ids_of["<image_id>"] not in got.ids and ids_of["<slice>"] not in got.ids


def test_message_parts_flatten_as_the_hub_chat_does(loaded, tiny):
    model, _, _ = loaded
    proc = processor_for(model, tiny[0])
    parts = [{"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "image"}]
    assert proc.message_text(parts, {"image": 2, "audio": 0}) == f"{TAG}\nWhat is this?\n{TAG}"


def test_bad_inputs_are_refused(loaded, tiny):
    from mistralrs_arch_vision.minicpmo import MiniCpmOProcessor
    from mistralrs_arch_vision.processors.minicpmo import MiniCpmImageProcessor
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    model, _, _ = loaded
    out = tiny[0]
    proc = processor_for(model, out)
    img = loaded_image(1, (20, 20))
    with pytest.raises(ValueError, match="2 image placeholder"):
        proc.expand_prompt(f"{TAG} and {TAG}", [img])
    with pytest.raises(ValueError, match="<unk>"):
        proc.expand_prompt(f"{TAG} says <unk>", [img])
    with pytest.raises(ValueError, match="image_feature_size 5 differs"):
        processor_for(model, out, image_feature_size=5)
    with pytest.raises(ValueError, match="patch_size 3 differs"):
        processor_for(model, out, patch_size=3)
    with pytest.raises(ValueError, match="no '<region>' token"):
        processor_for(model, out, slice_start="<region>")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        MiniCpmOProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR)
    with pytest.raises(ValueError, match="max_slice_nums"):
        MiniCpmImageProcessor.from_hf({"max_slice_nums": 0})
    with pytest.raises(ValueError, match="norm_std"):
        MiniCpmImageProcessor.from_hf({"norm_std": [0.5, 0.5]})
    with pytest.raises(ValueError, match="holds no 2x2 patch"):
        MiniCpmImageProcessor.from_hf({**PREPROCESSOR, "slice_mode": False})(random_image(0, (1, 9)))
    assert Tokenizer.from_dir(out) is not None
    from mistralrs_core.engine.step import FeatureSpan
    with pytest.raises(ValueError, match="audio"):
        model.encode_features([FeatureSpan(start=0, length=QUERIES, content_hash=b"a", data=np.zeros(8))])


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.MiniCpmO, dtype="F32"),
               pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


def ref_logits_spans(ref, ids, data, spans):
    return ref.logits(ids, data, spans)


def check_against_reference(pipe, ref, req, res, n=6):
    prepare = lambda data: ref.slice_features([(d.pixels, d.tgt_size) for d in data]) if data else []  # noqa: E731
    return vision_testing.check_against_reference(pipe, partial(ref_logits_spans, ref), req, res, n, prepare)


def test_runner_batches_image_and_text_requests(runner, tiny):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(random_image(1, (40, 18))), png_data_uri(random_image(2, (14, 40)))
    reqs = [chat([{"type": "image_url", "image_url": {"url": url_a}}, {"type": "text", "text": "Describe it."}]),
            chat("Tell me a story about the Rust type system."),
            chat([{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": url_a}},
                  {"type": "image_url", "image_url": {"url": url_b}}])]
    alone = [runner.send_chat_completion_request(r) for r in reqs]
    together = run_concurrently(runner, reqs)
    for a, t in zip(alone, together):
        assert a.choices[0].message.content == t.choices[0].message.content
        assert [e.logprob for e in a.choices[0].logprobs.content] == \
            pytest.approx([e.logprob for e in t.choices[0].logprobs.content], abs=1e-4)
    for req, res in zip(reqs, together):
        check_against_reference(pipe, ref, req, res)
    prompt = pipe.chat_prompt(reqs[2])
    assert len(prompt.spans) > 2


def test_runner_refuses_a_broken_image_and_keeps_serving(runner):
    bad = chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]"):
        runner.send_chat_completion_request(bad)
    # MiniCPM-o's audio encoder is not built (upstream mistral.rs takes images only too).
    wav = "data:audio/wav;base64,UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA="
    audio = chat([{"type": "audio_url", "audio_url": {"url": wav}}, {"type": "text", "text": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]\.audio_url: this model does not take audio"):
        runner.send_chat_completion_request(audio)
    ok = runner.send_chat_completion_request(chat("Hello there"))
    assert ok.choices[0].message.content
