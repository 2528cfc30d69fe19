"""Idefics2 against transformers' ``Idefics2ForConditionalGeneration`` (tiny, every parameter
perturbed): image features of differently sized images (the reference pads them into one
batch with a pixel mask; we encode each at its own size), prefill + cached decode logits with
0, 1 and 2 images, greedy tokens; the processor (pixels, crops, prompt expansion) with and
without image splitting against transformers' PIL-path ``Idefics2Processor``; then the model
through the Runner (``Which.VisionPlain``), an image request batched with a text one."""

import numpy as np
from functools import partial

import pytest
import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_idefics2 import FAKE, IMG, LATENTS, PATCH, PREPROCESSOR, write_tiny_idefics2  # noqa: E402
import vision_testing  # noqa: E402
from vision_testing import chat, mixed_requests, OneSequence, png_data_uri, random_image, run_concurrently  # noqa: E402

COVERS = ["Idefics2"]
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_idefics2(tmp_path_factory.mktemp("tiny_idefics2"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


def padded(images):
    """The reference's batch: [1, N, 3, Hmax, Wmax] zero-padded, and its pixel mask."""
    hm, wm = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    px = torch.zeros(1, len(images), 3, hm, wm)
    mask = torch.zeros(1, len(images), hm, wm, dtype=torch.long)
    for k, im in enumerate(images):
        px[0, k, :, :im.shape[1], :im.shape[2]] = im
        mask[0, k, :im.shape[1], :im.shape[2]] = 1
    return px, mask


def ref_features(ref, images):
    px, mask = padded(images)
    with torch.inference_mode():
        feats = ref.model.get_image_features(pixel_values=px, pixel_attention_mask=mask).pooler_output[0]
    return list(feats.view(len(images), LATENTS, -1))


def pixels(g, h, w):
    return torch.randn(3, h, w, generator=g)


def test_image_features_match_reference(loaded):
    """Images of different shapes (and one whose sides are not multiples of the patch) in
    one call: each equals the reference's padded, masked batch."""
    model, ref, _ = loaded
    g = torch.Generator().manual_seed(0)
    images = [pixels(g, 12, 12), pixels(g, 16, 28), pixels(g, 28, 13), pixels(g, 12, 12)]
    with torch.inference_mode():
        ours = model.image_features(images)
    theirs = ref_features(ref, images)
    assert [tuple(f.shape) for f in ours] == [(LATENTS, 64)] * 4
    assert max(max_rel_err(a, b) for a, b in zip(ours, theirs)) <= TOL
    # Alone, an image reads the same as in a padded batch: the mask hides the padding.
    with torch.inference_mode():
        alone = model.image_features(images[:1])[0]
    assert max_rel_err(alone, ours[0]) <= TOL
    assert max_rel_err(ours[0], ours[1]) > 1e-2


def test_fractional_positions_match_reference(loaded):
    """The position-table cells of h x w patch grids, against the reference's embeddings."""
    from mistralrs_arch_vision.towers.siglip_navit import fractional_position_ids
    _, ref, _ = loaded
    emb = ref.model.vision_model.embeddings
    for rows, cols in [(3, 3), (4, 4), (7, 3), (5, 6), (1, 7)]:
        px = torch.zeros(1, 3, rows * PATCH, cols * PATCH)
        mask = torch.ones(1, rows, cols, dtype=torch.bool)
        with torch.inference_mode():
            got = emb(px, mask)[0] - emb.patch_embedding(px).flatten(2).transpose(1, 2)[0]
        ids = fractional_position_ids(rows, cols, 4)
        assert torch.allclose(got, emb.position_embedding.weight[ids], atol=1e-6), (rows, cols)


def prompt_with_images(ids_of, images, text_ids):
    """text, then per image <fake> image tokens <fake> and more text."""
    ids, spans = list(text_ids[:3]), []
    for k, px in enumerate(images):
        ids.append(ids_of[FAKE])
        spans.append(FeatureSpan(start=len(ids), length=LATENTS, content_hash=bytes([k]), data=px))
        ids += [ids_of[IMG]] * LATENTS + [ids_of[FAKE]] + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


@torch.inference_mode()
def ref_logits(ref, ids, images):
    """transformers' own forward: features on the image token ids."""
    kw = {}
    if images:
        px, mask = padded(images)
        kw = {"pixel_values": px, "pixel_attention_mask": mask}
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


@torch.inference_mode()
def ref_logits_spans(ref, ids, images, spans):
    """The reference fed embeddings, features on the prompt's spans only: a random model may
    *generate* the image-token id, which then is an ordinary token."""
    h = ref.get_input_embeddings()(torch.tensor([ids]))
    if images:
        for (start, n), f in zip(spans, ref_features(ref, images)):
            h[0, start:start + n] = f
    return ref(inputs_embeds=h).logits[0].float()


SIZES = [(20, 12), (12, 28)]      # (H, W): the two images differ


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(loaded, n_images):
    model, ref, ids_of = loaded
    g = torch.Generator().manual_seed(n_images)
    images = [pixels(g, h, w) for h, w in SIZES[:n_images]]
    text = torch.randint(0, ids_of[FAKE], (9,), generator=g).tolist()
    ids, spans = prompt_with_images(ids_of, images, text)
    run = OneSequence(model)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, images))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % ids_of[FAKE])
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq, images)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"

    where = [(s.start, s.length) for s in spans]
    run, seq, ours, theirs = OneSequence(model), list(ids), [], []
    logits = run.step(ids, spans)[-1]
    for _ in range(10):
        t = int(logits.argmax())
        ours.append(t)
        logits = run.step([t])[-1]
    for _ in range(10):
        theirs.append(int(ref_logits_spans(ref, seq, images, where)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


def test_checkpoint_names_map_to_every_parameter(loaded):
    """Every parameter of the module tree was loaded from the checkpoint (none left on meta)."""
    model, _, _ = loaded
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    assert model.connector.perceiver_resampler.latents.shape == (LATENTS, 64)


# idefics2-8b's config.json (the keys that shape the model).
IDEFICS2_8B = {
    "architectures": ["Idefics2ForConditionalGeneration"], "image_token_id": 32001, "model_type": "idefics2",
    "perceiver_config": {"model_type": "idefics2", "resampler_depth": 3, "resampler_head_dim": 96,
                         "resampler_n_heads": 16, "resampler_n_latents": 64},
    "text_config": {"model_type": "mistral", "rms_norm_eps": 1e-05, "sliding_window": 4096,
                    "vocab_size": 32003, "max_position_embeddings": 32768},
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                      "model_type": "idefics2", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14},
}


def test_released_config_reads_like_transformers():
    from mistralrs_arch_vision.idefics2 import Idefics2ForConditionalGeneration
    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration.from_hf_config(IDEFICS2_8B)
    ref = transformers.Idefics2Config(**IDEFICS2_8B)
    tc, pc, vc = ref.text_config, ref.perceiver_config, ref.vision_config
    c = model.cfg
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size,
            c.norm_eps, c.sliding_window) == \
        (tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_attention_heads,
         tc.num_key_value_heads, tc.vocab_size, tc.rms_norm_eps, tc.sliding_window)
    p = model.connector.perceiver_resampler.cfg
    assert (p.hidden_size, p.rms_norm_eps, p.resampler_n_latents, p.resampler_depth, p.resampler_n_heads,
            p.resampler_head_dim, p.num_key_value_heads, p.hidden_act) == \
        (pc.hidden_size, pc.rms_norm_eps, pc.resampler_n_latents, pc.resampler_depth, pc.resampler_n_heads,
         pc.resampler_head_dim, pc.num_key_value_heads, pc.hidden_act)
    v = model.vision_model.cfg
    assert (v.hidden_size, v.patch_size, v.image_size, v.num_hidden_layers) == \
        (vc.hidden_size, vc.patch_size, vc.image_size, vc.num_hidden_layers)
    assert model.vision_model.head is None and model.image_token_id == ref.image_token_id
    # An absent vision patch size is Idefics2's 32, not SigLIP's 16.
    with torch.device("meta"):
        bare = Idefics2ForConditionalGeneration.from_hf_config({**IDEFICS2_8B, "vision_config": {}})
    assert bare.vision_model.cfg.patch_size == transformers.Idefics2VisionConfig().patch_size == 32


def test_family_imports_no_other_plugin():
    import subprocess
    import sys
    code = ("import sys, mistralrs_arch_vision.idefics2\n"
            "print(sorted(m for m in sys.modules if m.startswith('mistralrs_arch_text')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": ":".join(p for p in sys.path if p)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- the processor
def _reference_processor(out, splitting: bool):
    from transformers import Idefics2ImageProcessorPil, Idefics2Processor, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    config = {k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"}
    ip = Idefics2ImageProcessorPil(**{**config, "do_image_splitting": splitting})
    return Idefics2Processor(image_processor=ip, tokenizer=tok, image_seq_len=LATENTS)


# (W, H): tall, wide, small, square, and one past the longest edge (resized down).
SHAPES = {"tall": (14, 40), "wide": (26, 13), "small": (9, 7), "square": (24, 24), "large": (61, 30)}


def _ours(model, out, splitting):
    from mistralrs_arch_vision.idefics2 import Idefics2Processor
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    return Idefics2Processor.from_pretrained(model=model, hf_config={}, tokenizer=Tokenizer.from_dir(out),
                                             preprocessor_config=dict(PREPROCESSOR, do_image_splitting=splitting))


@pytest.mark.parametrize("splitting", [False, True])
def test_prompt_expansion_matches_transformers_processor(loaded, tiny, splitting):
    from mistralrs_arch_vision.inputs import load_image
    model, _, ids_of = loaded
    out = tiny[0]
    ours = _ours(model, out, splitting)
    images = [random_image(i, size) for i, size in enumerate(SHAPES.values())]
    # Text right after an image (a space is added), an image after an image (one boundary).
    text = (f"<|im_start|>user\n{IMG}Describe {IMG}\nand {IMG}{IMG} then {IMG}<end_of_utterance>\n"
            f"<|im_start|>assistant\n")
    loaded_images = [load_image(png_data_uri(im), where="x") for im in images]
    got = ours.expand_prompt(text, loaded_images)
    want = _reference_processor(out, splitting)(text=text, images=images, return_tensors="pt")
    assert got.ids == want["input_ids"][0].tolist()
    crops = 5 if splitting else 1
    assert len(got.spans) == crops * len(images)
    ids = torch.tensor(got.ids)
    starts = torch.nonzero((ids == ids_of[IMG]).long().diff(prepend=torch.zeros(1, dtype=torch.long)) == 1)[:, 0]
    assert [(s.start, s.length) for s in got.spans] == [(int(s), LATENTS) for s in starts]
    assert all(ids[s.start - 1] == ids_of[FAKE] and ids[s.end] == ids_of[FAKE] for s in got.spans)
    # Each crop's pixels are the reference's padded crop cut to the mask's extent.
    px, mask = want["pixel_values"][0], want["pixel_attention_mask"][0]
    assert px.shape[0] == len(got.spans)
    for s, p, m in zip(got.spans, px, mask):
        h, w = int(m[:, 0].sum()), int(m[0].sum())
        assert s.data.shape == (3, h, w)
        assert torch.equal(s.data, p[:, :h, :w])
    hashes = [s.content_hash for s in got.spans]
    assert len(set(hashes)) == len(hashes)
    assert hashes[crops - 1] == loaded_images[0].content_hash     # the whole image keeps the image's key


def test_resize_rule_matches_reference():
    from transformers.models.idefics2.image_processing_pil_idefics2 import get_resize_output_image_size
    from transformers.image_utils import SizeDict
    from mistralrs_arch_vision.processors.idefics2 import resized_size
    for h, w in [(40, 14), (13, 26), (7, 9), (30, 61), (61, 30), (100, 100), (29, 28), (28, 29), (3, 200)]:
        want = get_resize_output_image_size(np.zeros((3, h, w)), SizeDict(shortest_edge=12, longest_edge=28))
        assert resized_size(h, w, 12, 28) == tuple(want), (h, w)


def test_placeholder_count_mismatch_is_refused(loaded, tiny):
    from mistralrs_arch_vision.inputs import load_image
    model, _, _ = loaded
    ours = _ours(model, tiny[0], False)
    img = load_image(png_data_uri(random_image(1)), where="x")
    with pytest.raises(ValueError, match="2 image placeholder"):
        ours.expand_prompt(f"{IMG} and {IMG}", [img])


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Idefics2, dtype="F32"),
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
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    assert [s.data.shape[1:] for s in prompts[2].spans] == [(28, 12), (21, 28)]   # two sizes, one call
    assert all(p.ids.count(ids_of[IMG]) == LATENTS * len(p.spans) for p in prompts)
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_llama_text_model_matches_reference(tmp_path):
    """A Llama text model (``text_config.model_type: llama``) behind the same connector."""
    out, ref, ids_of = write_tiny_idefics2(tmp_path, text_type="llama")
    model, _ = build_text_model(out, kind="vision")
    g = torch.Generator().manual_seed(5)
    images = [pixels(g, 16, 24)]
    ids, spans = prompt_with_images(ids_of, images, torch.randint(0, ids_of[FAKE], (9,), generator=g).tolist())
    assert max_rel_err(OneSequence(model).step(ids, spans), ref_logits(ref, ids, images)) <= TOL


def test_runner_chunked_prefill_keeps_image_spans_whole(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 2                 # smaller than a span: chunks stretch to hold it
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(random_image(7))}}])
        steps = pipe.engine.stats["steps"]
        prompt = check_against_reference(pipe, ref, req, runner.send_chat_completion_request(req))
        assert pipe.engine.stats["steps"] - steps >= len(prompt.ids) // 3
    finally:
        sched.max_batch_tokens = old


def test_runner_with_image_splitting(tmp_path):
    """``do_image_splitting``: each image is five spans (four quadrants, then the whole image)
    of different sizes, encoded in one call, through the whole serving path."""
    import json
    from mistralrs import Runner, VisionArchitecture, Which
    out, ref, ids_of = write_tiny_idefics2(tmp_path)
    (out / "preprocessor_config.json").write_text(json.dumps(dict(PREPROCESSOR, do_image_splitting=True)))
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Idefics2, dtype="F32"),
               pa_blk_size=4, seed=0)
    try:
        pipe = r._pipeline(None)
        req = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(3, size=(31, 17)))}},
                    {"type": "text", "text": "What is in the picture?"}])
        prompt = check_against_reference(pipe, ref, req, r.send_chat_completion_request(req))
        assert len(prompt.spans) == 5
        assert len({tuple(s.data.shape) for s in prompt.spans}) > 1
        assert prompt.ids.count(ids_of[FAKE]) == 6           # neighbouring crops share a boundary
    finally:
        r.shutdown()
