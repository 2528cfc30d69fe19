"""Gemma 3 (vision) against transformers' ``Gemma3ForConditionalGeneration`` (tiny, every
parameter perturbed, ``token_type_ids`` given so image tokens attend both ways): image
features, prefill + cached decode logits with 0, 1 and 2 images, greedy tokens; the prompt
expansion (with and without pan-and-scan) against transformers' ``Gemma3Processor``; then the
model through the Runner (``Which.VisionPlain``), an image request batched with a text one."""

from functools import partial

import pytest
import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_gemma3 import BOI, EOI, IMAGE, MM_TOKENS, PREPROCESSOR, SOFT, write_tiny_gemma3  # noqa: E402
import vision_testing  # noqa: E402
from vision_testing import chat, mixed_requests, OneSequence, png_data_uri, random_image, run_concurrently  # noqa: E402

COVERS = ["Gemma3"]
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


def prompt_with_images(ids_of, pixels_list, text_ids):
    """text, then per image <boi> soft tokens <eoi> and more text."""
    ids, spans = list(text_ids[:3]), []
    for k, px in enumerate(pixels_list):
        ids.append(ids_of[BOI])
        spans.append(FeatureSpan(start=len(ids), length=MM_TOKENS, content_hash=bytes([k]), data=px,
                                 bidirectional=True))
        ids += [ids_of[SOFT]] * MM_TOKENS + [ids_of[EOI]] + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


def token_types(n, spans):
    tt = torch.zeros(1, n, dtype=torch.long)
    for start, length in spans:
        tt[0, start:start + length] = 1
    return tt


@torch.inference_mode()
def ref_logits(ref, ids, pixels, spans):
    """transformers' own forward: features on the image token ids, token_type_ids marking them."""
    kw = {"pixel_values": torch.stack(pixels)} if pixels else {}
    return ref(input_ids=torch.tensor([ids]), token_type_ids=token_types(len(ids), spans), **kw).logits[0].float()


@torch.inference_mode()
def ref_logits_spans(ref, ids, pixels, spans):
    """The reference fed embeddings, features on the prompt's spans only: a random model may
    *generate* the soft-token id, which then is an ordinary causal token."""
    h = ref.get_input_embeddings()(torch.tensor([ids]))
    if pixels:
        feats = ref.model.get_image_features(pixel_values=torch.stack(pixels)).pooler_output
        for (start, n), f in zip(spans, feats):
            h[0, start:start + n] = f
    return ref(inputs_embeds=h, token_type_ids=token_types(len(ids), spans)).logits[0].float()


def test_image_features_match_reference(loaded):
    model, ref, _ = loaded
    px = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        theirs = ref.model.get_image_features(pixel_values=px).pooler_output
        ours = model.image_features(px)
    assert ours.shape == (3, MM_TOKENS, 64)
    assert max_rel_err(ours, theirs) <= TOL


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(loaded, n_images):
    model, ref, ids_of = loaded
    g = torch.Generator().manual_seed(n_images)
    pixels = [torch.randn(3, IMAGE, IMAGE, generator=g) for _ in range(n_images)]
    text = torch.randint(0, ids_of[BOI], (9,), generator=g).tolist()
    ids, spans = prompt_with_images(ids_of, pixels, text)
    where = [(s.start, s.length) for s in spans]
    run = OneSequence(model)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, pixels, where))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % ids_of[BOI])
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq, pixels, where)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"

    run, seq, ours, theirs = OneSequence(model), list(ids), [], []
    logits = run.step(ids, spans)[-1]
    for _ in range(10):
        t = int(logits.argmax())
        ours.append(t)
        logits = run.step([t])[-1]
    for _ in range(10):
        theirs.append(int(ref_logits_spans(ref, seq, pixels, where)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


def test_image_tokens_attend_both_ways(loaded):
    """Without the bidirectional spans the logits move: the seam is exercised, not inert."""
    model, ref, ids_of = loaded
    px = [torch.randn(3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(9))]
    ids, spans = prompt_with_images(ids_of, px, list(range(20, 29)))
    causal = [FeatureSpan(s.start, s.length, s.content_hash, s.data) for s in spans]
    want = ref_logits(ref, ids, px, [(s.start, s.length) for s in spans])
    assert max_rel_err(OneSequence(model).step(ids, spans), want) <= TOL
    assert max_rel_err(OneSequence(model).step(ids, causal), want) > 1e-3


def _hub(name: str) -> str:
    """The released checkpoints' names: the tower nested under ``vision_model``."""
    return name.replace("vision_tower.", "vision_tower.vision_model.", 1)


def _transformers5(name: str) -> str:
    """transformers 5's in-memory names (what a state_dict saved without conversion holds)."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_checkpoint_layouts_load(tmp_path, loaded, layout):
    """The hub layout (``language_model.model.*``, ``vision_tower.vision_model.*``) and
    transformers 5's (``model.language_model.*``, ``model.vision_tower.*``, a tied
    ``lm_head.weight``) load to the same model as ``save_pretrained``'s output."""
    from safetensors.torch import load_file, save_file
    model, _, ids_of = loaded
    out, _, _ = write_tiny_gemma3(tmp_path)
    weights = load_file(str(out / "model.safetensors"))
    rename = _hub if layout == "hub" else _transformers5
    renamed = {rename(k): v for k, v in weights.items()}
    if layout == "transformers5":
        renamed["lm_head.weight"] = weights["language_model.model.embed_tokens.weight"].clone()
    assert renamed.keys() != weights.keys()
    save_file(renamed, str(out / "model.safetensors"))
    other, _ = build_text_model(out, kind="vision")
    px = torch.randn(2, 3, IMAGE, IMAGE)
    ids, spans = prompt_with_images(ids_of, [px[0]], list(range(20, 29)))
    with torch.inference_mode():
        assert torch.equal(other.image_features(px), model.image_features(px))
    assert torch.equal(OneSequence(other).step(ids, spans), OneSequence(model).step(ids, spans))


# gemma-3-4b-it's config.json (the keys that shape the model).
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_released_config_reads_like_transformers():
    """A hub config lists only what differs from the defaults: the derived model equals what
    transformers reads from the same file."""
    from mistralrs_arch_vision.gemma3 import Gemma3ForConditionalGeneration
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration.from_hf_config(GEMMA3_4B)
    ref = transformers.Gemma3Config(**GEMMA3_4B)
    tc = ref.text_config
    c = model.cfg
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == \
        (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim,
         tc.vocab_size)
    assert c.layer_types == tc.layer_types and c.sliding_window == 1024
    assert c.attn_scale == tc.query_pre_attn_scalar ** -0.5 and c.embed_scale == tc.hidden_size ** 0.5
    assert (c.rope.theta, c.rope.rope_type, c.rope.params.get("factor")) == (1_000_000.0, "linear", 8.0)
    assert (c.local_rope.theta, c.local_rope.rope_type) == (10_000.0, "default")
    assert tc.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert tc.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert c.tie_word_embeddings and c.qk_norm and c.sandwich_norms and c.final_softcap is None
    assert (model.image_token_id, model.boi_token_id, model.eoi_token_id, model.mm_tokens_per_image) == \
        (262144, 255999, 256000, 256)
    assert model.vision_tower.head is None and model.multi_modal_projector.kernel == 4


def test_family_imports_no_other_plugin():
    import subprocess
    import sys
    code = ("import sys, mistralrs_arch_vision.gemma3\n"
            "print(sorted(m for m in sys.modules if m.startswith('mistralrs_arch_text')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": ":".join(p for p in sys.path if p)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- the processor
def _reference_processor(out, pan_and_scan: bool):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"),
                                  extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT})
    ip = Gemma3ImageProcessorPil.from_dict(dict(PREPROCESSOR, do_pan_and_scan=pan_and_scan))
    return Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=MM_TOKENS)


SHAPES = {"tall": (24, 90), "wide": (100, 25), "small": (9, 7), "square": (40, 40)}


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_prompt_expansion_matches_transformers_processor(loaded, tiny, pan_and_scan):
    from mistralrs_arch_vision.gemma3 import Gemma3Processor
    from mistralrs_arch_vision.inputs import load_image
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    model, _, ids_of = loaded
    out = tiny[0]
    ours = Gemma3Processor.from_pretrained(model=model, hf_config={}, tokenizer=Tokenizer.from_dir(out),
                                           preprocessor_config=dict(PREPROCESSOR, do_pan_and_scan=pan_and_scan))
    images = [random_image(i, size) for i, size in enumerate(SHAPES.values())]
    text = (f"<|im_start|>user\n{BOI}Describe {BOI}\nand {BOI}{BOI}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    loaded_images = [load_image(png_data_uri(im), where="x") for im in images]
    got = ours.expand_prompt(text, loaded_images)
    ref = _reference_processor(out, pan_and_scan)
    if not pan_and_scan:
        want = ref(text=text, images=images, return_tensors="pt")
    else:
        # transformers 5.25's Gemma3Processor.__call__ never pans and scans (its class-level
        # do_pan_and_scan=False wins over the call's and the config's), so its pieces are
        # composed here: the image processor's crops, ``replace_image_token``'s text.
        pix = ref.image_processor(images, do_pan_and_scan=True, return_tensors="pt")
        pieces = text.split(BOI)
        expanded = pieces[0] + "".join(ref.replace_image_token(pix, i) + rest for i, rest in enumerate(pieces[1:]))
        want = ref.tokenizer(expanded, return_tensors="pt", return_token_type_ids=False)
        want["pixel_values"] = pix["pixel_values"]
        want["token_type_ids"] = (want["input_ids"] == ids_of[SOFT]).long()
        assert pix["num_crops"].tolist() == [4, 4, 0, 0]
    assert got.ids == want["input_ids"][0].tolist()
    types = want["token_type_ids"][0]
    assert [(s.start, s.length) for s in got.spans] == \
        [(int(s), MM_TOKENS) for s in torch.nonzero(torch.diff(types, prepend=types[:1] * 0) == 1)[:, 0]]
    assert all(s.bidirectional for s in got.spans)
    pixels = torch.stack([s.data for s in got.spans])
    assert torch.equal(pixels, want["pixel_values"])
    crops = [0, 0, 0, 0] if not pan_and_scan else [4, 4, 0, 0]
    assert len(got.spans) == 4 + sum(crops)
    if pan_and_scan:
        assert ours.tokenizer.decode(got.ids, skip_special_tokens=False).count(
            "Here is the original image") == 2
    # Crops share the image's prefix-cache identity but not each other's.
    hashes = [s.content_hash for s in got.spans]
    assert len(set(hashes)) == len(hashes)
    assert hashes[0] == loaded_images[0].content_hash


def test_placeholder_count_mismatch_is_refused(loaded, tiny):
    from mistralrs_arch_vision.gemma3 import Gemma3Processor
    from mistralrs_arch_vision.inputs import load_image
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    model, _, _ = loaded
    ours = Gemma3Processor.from_pretrained(model=model, hf_config={}, tokenizer=Tokenizer.from_dir(tiny[0]),
                                           preprocessor_config=PREPROCESSOR)
    img = load_image(png_data_uri(random_image(1)), where="x")
    with pytest.raises(ValueError, match="2 image placeholder"):
        ours.expand_prompt(f"{BOI} and {BOI}", [img])
    with pytest.raises(ValueError, match="image tokens form runs"):
        ours.expand_prompt(f"{BOI} and {SOFT}", [img])


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Gemma3, dtype="F32"),
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
    assert all(s.bidirectional for p in prompts for s in p.spans)
    assert all(p.ids.count(ids_of[SOFT]) == MM_TOKENS * len(p.spans) for p in prompts)
    assert all(p.ids.count(ids_of[BOI]) == p.ids.count(ids_of[EOI]) == len(p.spans) for p in prompts)
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_runner_chunked_prefill_keeps_image_spans_whole(runner, tiny):
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 3                 # smaller than a span: chunks stretch to hold it
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(random_image(7))}}])
        steps = pipe.engine.stats["steps"]
        prompt = check_against_reference(pipe, ref, req, runner.send_chat_completion_request(req))
        assert prompt.spans[0].start % 3 != 0
        assert pipe.engine.stats["steps"] - steps >= len(prompt.ids) // 4
    finally:
        sched.max_batch_tokens = old


def test_same_pixels_share_the_prefix_cache(runner, tiny):
    """A repeated image reuses its cached blocks, those inside the bidirectional span too
    (they were computed with the whole span); another image reuses only the blocks before it."""
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    blocks = pipe.engine.blocks
    img = random_image(11)
    text = {"type": "text", "text": "What is in this picture?"}
    first = chat([{"type": "image_url", "image_url": {"url": png_data_uri(img)}}, text])
    prompt = check_against_reference(pipe, ref, first, runner.send_chat_completion_request(first))
    span = prompt.spans[0]
    assert span.start // 4 != span.end // 4            # a block boundary inside the span
    hits = blocks.hits
    check_against_reference(pipe, ref, first, runner.send_chat_completion_request(first))
    assert blocks.hits - hits == ((len(prompt.ids) - 1) // 4) * 4
    hits = blocks.hits
    other = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(12))}}, text])
    check_against_reference(pipe, ref, other, runner.send_chat_completion_request(other))
    assert blocks.hits - hits == (prompt.spans[0].start // 4) * 4
