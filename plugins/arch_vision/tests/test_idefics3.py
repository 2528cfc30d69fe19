"""Idefics3 against transformers' ``Idefics3ForConditionalGeneration`` (tiny, every parameter
perturbed): tower + connector features (tile-sized and other sizes, whose positions are
fractional), prefill + cached decode logits with 0, 1 and 2 images, greedy tokens; the
image processor and prompt expansion against transformers' PIL-path ``Idefics3Processor``;
then the model through the Runner (``Which.VisionPlain``), an image request batched with a
text one."""

import numpy as np
from functools import partial

import pytest
import torch
from PIL import Image

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_idefics3 import (FAKE, GLOBAL, IMAGE, PREPROCESSOR, TILE, TOKENS,  # noqa: E402
                           write_tiny_idefics3)
import vision_testing  # noqa: E402
from vision_testing import chat, mixed_requests, OneSequence, png_data_uri, random_image, run_concurrently  # noqa: E402

COVERS = ["Idefics3"]
TOL = 1e-4
HIDDEN = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


def prompt_with_tiles(ids_of, tiles_per_image, text_ids, generator):
    """text, then per image its tiles (each <fake> <row/global tag> image tokens) and text;
    returns ids, spans and the tiles' pixels in prompt order."""
    ids, spans, pixels = list(text_ids[:3]), [], []
    for k, n in enumerate(tiles_per_image):
        for t in range(n):
            tag = GLOBAL if t == n - 1 else f"<row_1_col_{t + 1}>"
            ids += [ids_of[FAKE], ids_of[tag]]
            px = torch.randn(3, TILE, TILE, generator=generator)
            spans.append(FeatureSpan(start=len(ids), length=TOKENS, content_hash=bytes([k, t]), data=px))
            pixels.append(px)
            ids += [ids_of[IMAGE]] * TOKENS
        ids += [ids_of[FAKE]] + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans, pixels


@torch.inference_mode()
def ref_logits(ref, ids, pixels):
    """transformers' own forward: its features scattered onto the image token ids."""
    kw = {"pixel_values": torch.stack(pixels)[None]} if pixels else {}
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


@torch.inference_mode()
def ref_logits_spans(ref, ids, pixels, spans):
    """The reference fed embeddings, features on the prompt's spans only: a random model may
    *generate* the image-token id, which then is an ordinary token."""
    h = ref.get_input_embeddings()(torch.tensor([ids]))
    if pixels:
        feats = ref.model.get_image_features(pixel_values=torch.stack(pixels)[None]).pooler_output[0]
        feats = feats.view(len(pixels), -1, feats.shape[-1])
        for (start, n), f in zip(spans, feats):
            h[0, start:start + n] = f
    return ref(inputs_embeds=h).logits[0].float()


@pytest.mark.parametrize("side", [TILE, 2 * 7, 6 * 7])
def test_image_features_match_reference(loaded, side):
    """A tile-sized input reads the position table as it is; smaller and larger grids
    (2 x 2, 6 x 6 patches on the 4 x 4 table) take fractional positions."""
    model, ref, _ = loaded
    px = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(side))
    with torch.inference_mode():
        theirs = ref.model.get_image_features(pixel_values=px[None]).pooler_output[0]
        ours = model.image_features(px)
    assert ours.shape == (3, (side // 14) ** 2, HIDDEN)
    assert max_rel_err(ours.reshape(-1, HIDDEN), theirs) <= TOL


def test_fractional_positions_are_not_the_plain_table(loaded):
    """The 6 x 6 grid does read repeated table cells: the seam is exercised, not inert."""
    from mistralrs_arch_vision.towers.siglip_navit import fractional_position_ids
    assert fractional_position_ids(4, 4, 4).tolist() == list(range(16))
    six = fractional_position_ids(6, 6, 4)
    assert six.unique().numel() == 16 and six.numel() == 36
    assert fractional_position_ids(2, 2, 4).tolist() == [0, 2, 8, 10]


@pytest.mark.parametrize("tiles_per_image", [[], [1], [4, 1]])
def test_prefill_and_decode_logits_match_reference(loaded, tiles_per_image):
    model, ref, ids_of = loaded
    g = torch.Generator().manual_seed(len(tiles_per_image))
    text = torch.randint(0, ids_of[FAKE], (9,), generator=g).tolist()
    ids, spans, pixels = prompt_with_tiles(ids_of, tiles_per_image, text, g)
    run = OneSequence(model, num_blocks=96)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, pixels))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % ids_of[FAKE])
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq, pixels)[-1]))
    assert worst <= TOL, f"{tiles_per_image}: relative logit error {worst:.2e}"

    where = [(s.start, s.length) for s in spans]
    run, seq, ours, theirs = OneSequence(model, num_blocks=96), list(ids), [], []
    logits = run.step(ids, spans)[-1]
    for _ in range(10):
        t = int(logits.argmax())
        ours.append(t)
        logits = run.step([t])[-1]
    for _ in range(10):
        theirs.append(int(ref_logits_spans(ref, seq, pixels, where)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


def test_pixel_shuffle_matches_reference_layout():
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as Ref
    from mistralrs_arch_vision.towers.idefics3 import Idefics3Connector
    x = torch.randn(2, 36, 5)
    ours = Idefics3Connector(5, 8, 3).pixel_shuffle(x)
    assert torch.equal(ours, Ref.pixel_shuffle(None, x, 3))


# A config shaped like SmolVLM-256M-Instruct's (scale_factor 4, 512-pixel tiles of 16-pixel patches).
SMOLVLM_256M = {
    "architectures": ["Idefics3ForConditionalGeneration"], "image_token_id": 49190, "model_type": "idefics3",
    "scale_factor": 4,
    "text_config": {"hidden_size": 576, "intermediate_size": 1536, "max_position_embeddings": 8192,
                    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
                    "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_theta": 100000,
                    "tie_word_embeddings": False, "vocab_size": 49280},
    "vision_config": {"hidden_size": 768, "image_size": 512, "intermediate_size": 3072,
                      "model_type": "idefics3_vision", "num_attention_heads": 12, "num_hidden_layers": 12,
                      "patch_size": 16},
}


def test_released_config_reads_like_transformers():
    from mistralrs_arch_vision.idefics3 import Idefics3ForConditionalGeneration
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration.from_hf_config(SMOLVLM_256M)
        ref = transformers.Idefics3Config(**SMOLVLM_256M)
    tc, vc = ref.text_config, ref.vision_config
    c = model.cfg
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size, c.norm_eps) == \
        (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads, tc.vocab_size,
         tc.rms_norm_eps)
    v = model.vision_tower.cfg
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size, v.hidden_act) == \
        (vc.hidden_size, vc.num_hidden_layers, vc.patch_size, vc.image_size, vc.hidden_act)
    assert model.tokens_per_image == 64 == int((vc.image_size // vc.patch_size) ** 2 / ref.scale_factor ** 2)
    assert model.image_token_id == 49190 and model.vision_tower.head is None
    assert model.connector.modality_projection.proj.weight.shape == (576, 768 * 16)
    assert not c.tie_word_embeddings


@pytest.mark.parametrize("outer, inner", [(None, True), (True, False)])
def test_the_composite_flag_ties_the_head(tmp_path, outer, inner):
    """transformers 5 ties ``lm_head`` to the embeddings by the top-level flag alone."""
    from mistralrs_arch_vision.idefics3 import Idefics3ForConditionalGeneration
    hf = dict(SMOLVLM_256M, text_config=dict(SMOLVLM_256M["text_config"], tie_word_embeddings=inner))
    if outer is not None:
        hf["tie_word_embeddings"] = outer
    with torch.device("meta"):
        ours = Idefics3ForConditionalGeneration.from_hf_config(hf)
        ref = transformers.Idefics3ForConditionalGeneration(transformers.Idefics3Config(**hf))
    assert ours.cfg.tie_word_embeddings == bool(ref.get_expanded_tied_weights_keys()) == bool(outer)


def test_family_imports_no_other_plugin():
    import subprocess
    import sys
    code = ("import sys, mistralrs_arch_vision.idefics3\n"
            "print(sorted(m for m in sys.modules if m.startswith('mistralrs_arch_text')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": ":".join(p for p in sys.path if p)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- the processor
SHAPES = {"tall": (24, 90), "wide": (100, 25), "small": (9, 7), "square": (40, 40), "rgba": (50, 31)}
CONFIGS = {"split": PREPROCESSOR,
           "one_tile": dict(PREPROCESSOR, size={"longest_edge": TILE}),     # splitting on, nothing to split
           "no_split": dict(PREPROCESSOR, do_image_splitting=False)}


def _images():
    images = [random_image(i, size) for i, size in enumerate(SHAPES.values())]
    rgba = np.dstack([np.asarray(images[-1]), np.random.default_rng(5).integers(0, 256, (31, 50), dtype=np.uint8)])
    images[-1] = Image.fromarray(rgba, "RGBA")
    return images


def _reference_processor(out, config):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    return Idefics3Processor(image_processor=Idefics3ImageProcessorPil.from_dict(dict(config)), tokenizer=tok,
                             image_seq_len=TOKENS)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_prompt_expansion_matches_transformers_processor(loaded, tiny, config):
    from mistralrs_arch_vision.idefics3 import Idefics3Processor
    from mistralrs_arch_vision.inputs import load_image
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    model, _, ids_of = loaded
    out = tiny[0]
    ours = Idefics3Processor.from_pretrained(model=model, hf_config={}, tokenizer=Tokenizer.from_dir(out),
                                             preprocessor_config=CONFIGS[config])
    images = _images()
    text = (f"<|im_start|>user\n{IMAGE}Describe {IMAGE}\nand {IMAGE}{IMAGE} then{IMAGE}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    loaded_images = [load_image(png_data_uri(im), where="x") for im in images]
    got = ours.expand_prompt(text, loaded_images)
    # The reference sees what the pipeline hands the processor (load_image's RGB; the RGBA
    # image's compositing is checked on the image processor alone below).
    want = _reference_processor(out, CONFIGS[config])(text=text, images=[li.image for li in loaded_images],
                                                      return_tensors="pt")
    assert got.ids == want["input_ids"][0].tolist()
    tiles = want["pixel_values"][0]
    assert torch.equal(torch.stack([s.data for s in got.spans]), tiles)
    # Every tile is whole: the reference's pixel mask is all ones, which is why we have none.
    assert want["pixel_attention_mask"].shape[1] == len(got.spans) and bool(want["pixel_attention_mask"].all())
    image_pos = [i for i, t in enumerate(got.ids) if t == ids_of[IMAGE]]
    assert [p for s in got.spans for p in range(s.start, s.end)] == image_pos
    assert all(s.length == TOKENS and not s.bidirectional for s in got.spans)
    per_image = {"split": [4, 4, 10, 10, 7], "one_tile": [1] * 5, "no_split": [1] * 5}[config]
    assert len(got.spans) == sum(per_image)
    # Tiles of one image share its identity (keyed by it and the tile index), no two alike.
    hashes = [s.content_hash for s in got.spans]
    assert len(set(hashes)) == len(hashes)
    from mistralrs_arch_vision.idefics3 import tile_hash
    assert hashes[:per_image[0]] == [tile_hash(loaded_images[0].content_hash, k) for k in range(per_image[0])]


def test_image_processor_tile_grids():
    """Grids and pixels per shape as the reference's, tall/wide/small/square and an RGBA image
    (transparency composited onto white, as the reference converts it)."""
    from transformers import Idefics3ImageProcessorPil
    from mistralrs_arch_vision.processors.idefics3 import Idefics3ImageProcessor
    ours = Idefics3ImageProcessor.from_hf(PREPROCESSOR)
    ref = Idefics3ImageProcessorPil.from_dict(dict(PREPROCESSOR))
    images = _images()
    want = ref(images, return_row_col_info=True, return_tensors="pt")
    got = [ours(im) for im in images]
    assert [(t.rows, t.cols) for t in got] == list(zip(want["rows"][0], want["cols"][0]))
    assert [(t.rows, t.cols) for t in got] == [(3, 1), (1, 3), (3, 3), (3, 3), (2, 3)]
    assert torch.equal(torch.cat([t.pixels for t in got]), want["pixel_values"][0])


def test_placeholder_count_mismatch_is_refused(loaded, tiny):
    from mistralrs_arch_vision.idefics3 import Idefics3Processor
    from mistralrs_arch_vision.inputs import load_image
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    model, _, _ = loaded
    ours = Idefics3Processor.from_pretrained(model=model, hf_config={}, tokenizer=Tokenizer.from_dir(tiny[0]),
                                             preprocessor_config=PREPROCESSOR)
    img = load_image(png_data_uri(random_image(1)), where="x")
    with pytest.raises(ValueError, match="2 image placeholder"):
        ours.expand_prompt(f"{IMAGE} and {IMAGE}", [img])
    with pytest.raises(ValueError, match="max_image_size"):
        Idefics3Processor.from_pretrained(model=model, hf_config={}, tokenizer=Tokenizer.from_dir(tiny[0]),
                                          preprocessor_config=dict(PREPROCESSOR, max_image_size={"longest_edge": 14}))


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Idefics3, dtype="F32"),
               pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


def check_against_reference(pipe, ref, req, res, n=6):
    return vision_testing.check_against_reference(pipe, partial(ref_logits_spans, ref), req, res, n)


def test_runner_batches_image_and_text_requests(runner, tiny):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, ids_of = tiny
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(random_image(1)), png_data_uri(random_image(2, size=(20, 50)))
    reqs = mixed_requests(url_a, url_b)
    steps = pipe.engine.stats["steps"]
    results = run_concurrently(runner, reqs)
    prompts = [check_against_reference(pipe, ref, q, r) for q, r in zip(reqs, results)]
    # image a (37 x 29 -> 84 x 66): 3 x 3 tiles + global; image b (20 x 50 -> 34 x 84): 3 x 2 + global
    assert [len(p.spans) for p in prompts] == [10, 0, 7 + 10]
    assert all(p.ids.count(ids_of[IMAGE]) == TOKENS * len(p.spans) for p in prompts)
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_runner_chunked_prefill_keeps_tile_spans_whole(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 3                 # smaller than a span: chunks stretch to hold it
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(random_image(7, size=(30, 20)))}}])
        steps = pipe.engine.stats["steps"]
        prompt = check_against_reference(pipe, ref, req, runner.send_chat_completion_request(req))
        assert len(prompt.spans) == 2 * 3 + 1 and any(s.start % 3 for s in prompt.spans)   # 84 x 56
        assert pipe.engine.stats["steps"] - steps >= len(prompt.ids) // 4
    finally:
        sched.max_batch_tokens = old


def test_same_pixels_share_the_prefix_cache(runner, tiny):
    """A repeated image reuses its cached blocks across all its tiles; another image reuses
    only the blocks before its first tile."""
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    blocks = pipe.engine.blocks
    img = random_image(11, size=(30, 20))
    text = {"type": "text", "text": "What is in this picture?"}
    first = chat([{"type": "image_url", "image_url": {"url": png_data_uri(img)}}, text])
    prompt = check_against_reference(pipe, ref, first, runner.send_chat_completion_request(first))
    hits = blocks.hits
    check_against_reference(pipe, ref, first, runner.send_chat_completion_request(first))
    assert blocks.hits - hits == ((len(prompt.ids) - 1) // 4) * 4
    hits = blocks.hits
    other = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(12, size=(30, 20)))}}, text])
    check_against_reference(pipe, ref, other, runner.send_chat_completion_request(other))
    assert blocks.hits - hits == (prompt.spans[0].start // 4) * 4
