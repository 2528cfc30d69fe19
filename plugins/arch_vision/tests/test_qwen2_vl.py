"""Qwen2-VL and Qwen2.5-VL against transformers (tiny, every parameter perturbed): the towers
on batches of differently sized images (Qwen2.5's windows cut at image edges), M-RoPE
positions against ``get_rope_index``, prefill + cached decode logits with 0, 1 and 2 images,
greedy 32 tokens, both checkpoint layouts, the prompt expansion against transformers'
``Qwen2VLProcessor``; then the Runner: image requests batched with a text request, chunked
prefill through an image, bad input."""
import pytest
import torch

from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.engine.step import FeatureSpan, StepRecord
from mistralrs_core.layers.recurrent import make_layer_cache
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from test_mistral3 import image  # noqa: E402
from tiny_qwen2_vl import FACTOR, MERGE, PATCH, PREPROCESSOR, TEMPLATE, write_tiny_qwen2_vl  # noqa: E402
from vision_testing import chat, mixed_requests, png_data_uri, run_concurrently  # noqa: E402

from mistralrs_arch_vision.processors.qwen2_vl import Qwen2VLImageProcessor, QwenVisionInput  # noqa: E402
from mistralrs_arch_vision.qwen2_vl import Qwen2VLProcessor  # noqa: E402

COVERS = ["Qwen2VL", "Qwen2_5VL"]
TOL = 1e-4
FAMILIES = {"qwen2": False, "qwen25": True}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    out, ref, ids = write_tiny_qwen2_vl(tmp_path_factory.mktemp(request.param), qwen25=FAMILIES[request.param])
    model, _ = build_text_model(out, kind="vision")
    return out, ref, ids, model


def processor():
    return Qwen2VLImageProcessor.from_config(PREPROCESSOR)


class Ours:
    """One sequence through our model: features spliced into the prefill, the model's M-RoPE
    positions (as the engine slices them), paged cache."""

    def __init__(self, model, block_size=4, num_blocks=128):
        self.model = model
        self.caches = [make_layer_cache(s, num_blocks, block_size, model.dtype, "cpu")
                       for s in model.kv_cache_specs()]
        self.blocks, self.block_size, self.pos, self.positions = list(range(num_blocks)), block_size, 0, None

    @torch.inference_mode()
    def step(self, ids, spans=()):
        if spans:
            self.positions = self.model.prompt_positions(ids, list(spans))
        pos = self.positions.slice(self.pos, len(ids)) if self.positions is not None else None
        tok, pos, meta = build_metadata([StepRecord(-1, list(ids), self.pos, self.blocks, positions=pos)],
                                        self.block_size, "cpu")
        h = self.model.embed(tok)
        if spans:
            feats = self.model.encode_features(list(spans))
            rows = torch.cat([torch.arange(s.start, s.end) for s in spans]) - self.pos
            h = self.model.merge_features(h, rows, torch.cat(feats))
        self.pos += len(ids)
        return self.model.compute_logits(self.model.forward_embeds(h, torch.as_tensor(pos), meta, self.caches))


def build_prompt(images, text_ids, image_token):
    """text, then each image's run followed by more text (what the pipeline builds)."""
    proc = processor()
    ids, spans = list(text_ids[:3]), []
    for k, img in enumerate(images):
        data = proc(img)
        n = proc.num_tokens(data.grid_thw)
        spans.append(FeatureSpan(start=len(ids), length=n, content_hash=bytes([k]), data=data))
        ids += [image_token] * n + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


def ref_inputs(spans):
    if not spans:
        return {}
    return {"pixel_values": torch.cat([s.data.patches for s in spans]),
            "image_grid_thw": torch.tensor([list(s.data.grid_thw) for s in spans])}


def type_ids(n, spans):
    mm = torch.zeros(1, n, dtype=torch.long)
    for s in spans:
        mm[0, s.start:s.end] = 1
    return mm


@torch.inference_mode()
def ref_logits(ref, ids, spans):
    """transformers' own forward: it finds the image rows by token id and computes M-RoPE
    from ``mm_token_type_ids`` as its processor emits them (1 on image tokens)."""
    return ref(input_ids=torch.tensor([ids]), mm_token_type_ids=type_ids(len(ids), spans),
               **ref_inputs(spans)).logits[0].float()


class RefSpans:
    """The reference fed embeddings with features on the prompt's spans only (a random model
    may generate the image token id, an ordinary token then) and positions from its own
    ``get_rope_index``; the tower runs once, not once per generated token."""

    @torch.inference_mode()
    def __init__(self, ref, spans):
        self.ref, self.spans, self.kw = ref, spans, ref_inputs(spans)
        self.feats = ref.model.get_image_features(**self.kw).pooler_output if spans else ()

    @torch.inference_mode()
    def logits(self, ids):
        h = self.ref.get_input_embeddings()(torch.tensor([ids]))
        pos = None
        if self.spans:
            for s, f in zip(self.spans, self.feats):
                h[0, s.start:s.end] = f
            pos, _ = self.ref.model.get_rope_index(torch.tensor([ids]), type_ids(len(ids), self.spans),
                                                   image_grid_thw=self.kw["image_grid_thw"])
        return self.ref(inputs_embeds=h, position_ids=pos).logits[0].float()


# --------------------------------------------------------------------------- tower, positions
def test_tower_on_images_of_different_sizes_matches_reference(tiny):
    _, ref, _, model = tiny
    proc = processor()
    # 3 x 5 merged tokens (Qwen2.5: windows of 2 x 2 cut at both edges), 2 x 2, a tall one
    inputs = [proc(image(40, 24, seed=1)), proc(image(16, 16, seed=2)), proc(image(9, 60, seed=3))]
    assert inputs[0].grid_thw == (1, 6, 10)
    with torch.inference_mode():
        ours = model.image_features(inputs)
        theirs = ref.model.get_image_features(pixel_values=torch.cat([i.patches for i in inputs]),
                                              image_grid_thw=torch.tensor([list(i.grid_thw) for i in inputs]))
    for o, t in zip(ours, theirs.pooler_output):
        assert o.shape == t.shape
        assert max_rel_err(o, t) <= TOL


def test_tower_on_several_frames_matches_reference(tiny):
    """The model side of video input (the pipeline takes no video parts yet): 4 frames make a
    grid of t = 2 temporal patches."""
    _, ref, _, model = tiny
    proc = processor()
    frames = torch.stack([proc.pixels(image(40, 24, seed=s)) for s in range(4)])
    clip = proc.patchify(frames)
    assert clip.grid_thw == (2, 6, 10)
    with torch.inference_mode():
        ours = model.image_features([clip, proc(image(16, 16, seed=2))])
        theirs = ref.model.get_video_features(pixel_values_videos=clip.patches,
                                              video_grid_thw=torch.tensor([list(clip.grid_thw)])).pooler_output
    assert ours[0].shape == theirs[0].shape == (2 * 3 * 5, 64)
    assert max_rel_err(ours[0], theirs[0]) <= TOL


def test_window_order_matches_reference():
    from transformers.vision_utils import get_vision_window_index
    from mistralrs_arch_vision.towers.qwen_vit import window_order
    grids = [(1, 6, 10), (1, 2, 2), (2, 8, 4), (1, 14, 6)]
    want_idx, want_cu = get_vision_window_index(torch.tensor(grids), MERGE, 2 * FACTOR, PATCH)
    idx, lens = window_order(grids, MERGE, 2)
    assert torch.equal(idx, want_idx)
    assert [0] + torch.tensor(lens).cumsum(0).tolist() == want_cu.tolist()


@pytest.mark.parametrize("n_images", [0, 1, 2, 3])
def test_positions_match_get_rope_index(tiny, n_images):
    _, ref, ids_of, model = tiny
    text = list(range(20, 40))
    images = [image(40, 24, seed=1), image(9, 60, seed=3), image(16, 16, seed=2)][:n_images]
    ids, spans = build_prompt(images, text, ids_of["<|image_pad|>"])
    got = model.prompt_positions(ids, spans)
    if n_images == 0:
        assert got is None
        return
    kw = ref_inputs(spans)
    want, delta = ref.model.get_rope_index(torch.tensor([ids]), type_ids(len(ids), spans),
                                           image_grid_thw=kw["image_grid_thw"])
    assert got.positions.tolist() == want[:, 0].tolist()
    assert got.delta == int(delta)
    # generated tokens: index + delta on every axis
    assert got.slice(len(ids), 2).tolist() == [[len(ids) + got.delta, len(ids) + 1 + got.delta]] * 3


# --------------------------------------------------------------------------- logits
@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(tiny, n_images):
    _, ref, ids_of, model = tiny
    img_tok = ids_of["<|image_pad|>"]
    g = torch.Generator().manual_seed(n_images)
    images = [image(50, 20, seed=1), image(13, 30, seed=2)][:n_images]
    text = torch.randint(0, ids_of["<|vision_start|>"], (9,), generator=g).tolist()
    ids, spans = build_prompt(images, text, img_tok)
    if n_images == 2:
        assert spans[0].length != spans[1].length             # different sizes
    run = Ours(model)
    worst = max_rel_err(run.step(ids, spans), ref_logits(ref, ids, spans))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % ids_of["<|vision_start|>"])
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq, spans)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"


def test_greedy_32_tokens_identical(tiny):
    _, ref, ids_of, model = tiny
    ids, spans = build_prompt([image(50, 20, seed=4), image(13, 30, seed=5)], list(range(30, 45)),
                              ids_of["<|image_pad|>"])
    run, ours = Ours(model), []
    logits = run.step(ids, spans)[-1]
    for _ in range(32):
        ours.append(int(logits.argmax()))
        logits = run.step([ours[-1]])[-1]
    seq, theirs, reference = list(ids), [], RefSpans(ref, spans)
    for _ in range(32):
        theirs.append(int(reference.logits(seq)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


@pytest.mark.parametrize("qwen25", [False, True])
def test_hub_flat_config_and_transformers5_names(tmp_path, qwen25):
    """The hub's flat config.json with tied embeddings, weights named as transformers 5's
    modules; and a sliding-window text model."""
    out, ref, ids_of = write_tiny_qwen2_vl(tmp_path / "a", qwen25=qwen25, flat_config=True, nested_names=True,
                                           tie=True)
    model, _ = build_text_model(out, kind="vision")
    assert model.cfg.tie_word_embeddings
    ids, spans = build_prompt([image(30, 30, seed=7)], list(range(20, 40)), ids_of["<|image_pad|>"])
    assert max_rel_err(Ours(model).step(ids, spans), ref_logits(ref, ids, spans)) <= TOL

    out, ref, ids_of = write_tiny_qwen2_vl(tmp_path / "b", qwen25=qwen25, sliding=True)
    model, _ = build_text_model(out, kind="vision")
    assert model.cfg.layer_types == ["full_attention", "sliding_attention"]
    ids, spans = build_prompt([image(30, 30, seed=7)], list(range(20, 40)), ids_of["<|image_pad|>"])
    assert len(ids) > 6
    assert max_rel_err(Ours(model).step(ids, spans), ref_logits(ref, ids, spans)) <= TOL


# --------------------------------------------------------------------------- processor
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    out, ref, _, model = tiny
    arch = VisionArchitecture.Qwen2_5VL if model.qwen25 else VisionArchitecture.Qwen2VL
    r = Runner(which=Which.VisionPlain(model_id=str(out), arch=arch, dtype="F32"), pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


def hf_processor(out):
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor as HFProcessor

    class Unchecked(HFProcessor):
        # The argument class check loads the video processor registry, which needs
        # torchvision (not installed); the image processor and tokenizer are the real ones.
        def check_argument_for_proper_class(self, name, arg):
            return None
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    ip = Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if not k.endswith(("_type", "_class"))})
    return Unchecked(image_processor=ip, tokenizer=tok, chat_template=TEMPLATE)


def test_prompt_expansion_equals_transformers_processor(runner, tiny):
    out = tiny[0]
    pipe = runner._pipeline(None)
    imgs = [image(70, 30, seed=5), image(5, 7, seed=6), image(200, 150, seed=7)]
    parts = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": png_data_uri(imgs[0])}},
             {"type": "text", "text": "with"}, {"type": "image_url", "image_url": {"url": png_data_uri(imgs[1])}},
             {"type": "image_url", "image_url": {"url": png_data_uri(imgs[2])}}]
    prompt = pipe.chat_prompt(chat(parts))
    hf = hf_processor(out)
    text = hf.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"}, {"type": "image"},
        {"type": "image"}]}], add_generation_prompt=True, tokenize=False)
    want = hf(text=[text], images=imgs, return_tensors="pt")
    assert list(prompt.ids) == want["input_ids"][0].tolist()
    assert type_ids(len(prompt.ids), prompt.spans)[0].tolist() == want["mm_token_type_ids"][0].tolist()
    assert torch.equal(torch.cat([s.data.patches for s in prompt.spans]), want["pixel_values"])
    assert [list(s.data.grid_thw) for s in prompt.spans] == want["image_grid_thw"].tolist()


def test_processor_refuses_mismatched_settings(tiny):
    _, _, ids_of, model = tiny
    tok = type("Tok", (), {"token_to_id": staticmethod(ids_of.get)})()
    with pytest.raises(ValueError, match="patch_size 14 does not match"):
        Qwen2VLProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=dict(PREPROCESSOR,
                                                                                             patch_size=14),
                                         tokenizer=tok)
    no_pad = type("Tok", (), {"token_to_id": staticmethod(lambda t: None)})()
    with pytest.raises(ValueError, match="image_pad"):
        Qwen2VLProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                         tokenizer=no_pad)
    # defaults come from the tower when the preprocessor config leaves them out
    bare = {k: v for k, v in PREPROCESSOR.items() if k not in ("patch_size", "merge_size", "temporal_patch_size")}
    assert Qwen2VLProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=bare,
                                            tokenizer=tok).image_processor.factor == FACTOR
    span = FeatureSpan(start=0, length=3, content_hash=b"x", data=processor()(image(16, 16)))
    with pytest.raises(ValueError, match="span of 3 tokens"):
        model.encode_features([span])
    with pytest.raises(ValueError, match="patches must be"):
        model.visual(torch.zeros(4, 5), [(1, 2, 2)])


# --------------------------------------------------------------------------- through the Runner
@torch.inference_mode()
def ref_greedy(ref, ids, spans, n):
    ids, toks, lps, reference = list(ids), [], [], RefSpans(ref, spans)
    for _ in range(n):
        lp = torch.log_softmax(reference.logits(ids)[-1].double(), -1)
        toks.append(int(lp.argmax()))
        lps.append(float(lp[toks[-1]]))
        ids.append(toks[-1])
    return toks, lps


def check(pipe, ref, req, res, n=6):
    prompt = pipe.chat_prompt(req)
    want_toks, want_lps = ref_greedy(ref, prompt.ids, prompt.spans, n)
    assert res.usage.prompt_tokens == len(prompt.ids)
    assert [e.logprob for e in res.choices[0].logprobs.content] == pytest.approx(want_lps, abs=1e-4)
    assert res.choices[0].message.content == pipe.tokenizer.decode(want_toks)
    return prompt


def test_runner_batches_image_and_text_requests(runner, tiny):
    ref = tiny[1]
    pipe = runner._pipeline(None)
    url_a, url_b = png_data_uri(image(70, 30, seed=5)), png_data_uri(image(20, 45, seed=6))
    reqs = mixed_requests(url_a, url_b)
    alone = [runner.send_chat_completion_request(q) for q in reqs]
    steps = pipe.engine.stats["steps"]
    together = run_concurrently(runner, reqs)
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps
    prompts = [check(pipe, ref, q, res) for q, res in zip(reqs, together)]
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    for a, b in zip(alone, together):
        assert a.choices[0].message.content == b.choices[0].message.content
        assert [e.logprob for e in a.choices[0].logprobs.content] == pytest.approx(
            [e.logprob for e in b.choices[0].logprobs.content], abs=1e-5)


def test_runner_chunked_prefill_splits_inside_an_image(runner, tiny):
    ref = tiny[1]
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 5
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(image(60, 40, seed=8))}},
                    {"type": "text", "text": "Answer."}])
        prompt = check(pipe, ref, req, runner.send_chat_completion_request(req))
        assert prompt.spans[0].length > 10
    finally:
        sched.max_batch_tokens = old


def test_runner_bad_image_fails_only_its_request(runner, tiny):
    ref = tiny[1]
    pipe = runner._pipeline(None)
    bad = chat([{"type": "image_url", "image_url": {"url": png_data_uri(image(600, 2, seed=9))}}])
    good = chat("Hello there")
    with pytest.raises(ValueError, match="aspect ratio"):
        runner.send_chat_completion_request(bad)
    check(pipe, ref, good, runner.send_chat_completion_request(good))
