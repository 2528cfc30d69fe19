"""Qwen3-VL against transformers' ``Qwen3VLForConditionalGeneration`` (tiny, every parameter
perturbed): the tower with its deepstack mergers on packed images of several grids; prefill +
cached decode logits with 0, 1 and 2 images of different sizes through the model runner
(interleaved M-RoPE positions, deepstack features), including prefills chunked inside an
image; the processor's token counts against ``Qwen3VLProcessor``; both
checkpoint layouts; bad inputs; then the Runner (``Which.VisionPlain``): image and text
requests batched, and 32 greedy tokens after a prefill chunked inside an image."""
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from mistralrs_core.engine.model_runner import ModelRunner
from mistralrs_core.engine.step import FeatureSpan, StepRecord
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_qwen3_vl import DEEPSTACK, PATCH, PREPROCESSOR, TEMPORAL, tokenizer_of, write_tiny_qwen3_vl  # noqa: E402
from vision_testing import chat, mixed_requests, png_data_uri, run_concurrently  # noqa: E402

from mistralrs_arch_vision.qwen2_vl import Qwen2VLProcessor  # noqa: E402
from mistralrs_arch_vision.qwen3_vl import Qwen3VLForConditionalGeneration  # noqa: E402

COVERS = ["Qwen3VL"]
TOL = 1e-4


def image(width, height, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, ids = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, ids


@pytest.fixture(scope="module")
def proc(loaded, tiny):
    model, _, ids = loaded
    return Qwen2VLProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                            tokenizer=tokenizer_of(ids), model_dir=tiny[0])


# --------------------------------------------------------------------------- the reference
def _vision_inputs(spans):
    px = torch.cat([s.data.patches for s in spans])
    return px, torch.tensor([list(s.data.grid_thw) for s in spans])


@torch.inference_mode()
def ref_logits(ref, ids, spans):
    """transformers' own forward: the processor's outputs, image tokens found by id."""
    kw = {}
    ids_t = torch.tensor([ids])
    if spans:
        kw["pixel_values"], kw["image_grid_thw"] = _vision_inputs(spans)
        kw["mm_token_type_ids"] = (ids_t == ref.config.image_token_id).int()
    return ref(input_ids=ids_t, **kw).logits[0].float()


@torch.inference_mode()
def ref_image_features(ref, spans):
    return ref.model.get_image_features(*_vision_inputs(spans)) if spans else None


@torch.inference_mode()
def ref_logits_spans(ref, ids, spans, features=None):
    """The reference from its own parts, image features (and deepstack features and 3-D
    positions) put on the prompt's spans only: a random model may *generate* the image token
    id, which then is an ordinary token (the full forward would count it as a placeholder).
    ``features``: ``ref_image_features(ref, spans)``, computed once by callers that loop."""
    ids_t = torch.tensor([ids])
    h = ref.get_input_embeddings()(ids_t)
    mask = torch.zeros_like(ids_t, dtype=torch.bool)
    kw = {}
    if spans:
        _, grid = _vision_inputs(spans)
        out = features if features is not None else ref_image_features(ref, spans)
        for s in spans:
            mask[0, s.start:s.end] = True
        h[mask] = torch.cat(out.pooler_output)
        pos, _ = ref.model.get_rope_index(ids_t, mm_token_type_ids=mask.int(), image_grid_thw=grid)
        kw = dict(position_ids=pos, visual_pos_masks=mask,
                  deepstack_visual_embeds=[torch.cat(f) for f in out.deepstack_features])
    hidden = ref.model.language_model(inputs_embeds=h, **kw).last_hidden_state
    return ref.lm_head(hidden)[0].float()


# --------------------------------------------------------------------------- ours, through the model runner
class Seqs:
    """Sequences run through the engine's ``ModelRunner``: their records built as the
    scheduler builds them (model-supplied positions, the spans each chunk overlaps)."""

    def __init__(self, model, block_size=4, num_blocks=128):
        self.model, self.bs = model, block_size
        self.runner = ModelRunner(model, num_blocks, block_size, "cpu", model.dtype)
        self.free = list(range(num_blocks))
        self.seqs = {}

    def add(self, sid, ids, spans=()):
        spans = tuple(FeatureSpan(s.start, s.length, s.content_hash, s.data) for s in spans)
        self.seqs[sid] = dict(ids=list(ids), spans=spans, done=0, blocks=[],
                              pos=self.model.prompt_positions(list(ids), spans))

    def record(self, sid, n, logits_all=False):
        s = self.seqs[sid]
        start = s["done"]
        while len(s["blocks"]) * self.bs < start + n:
            s["blocks"].append(self.free.pop(0))
        over = tuple(sp for sp in s["spans"] if sp.start < start + n and sp.end > start)
        pos = s["pos"].slice(start, n) if s["pos"] is not None else None
        s["done"] += n
        return StepRecord(sid, s["ids"][start:start + n], start, list(s["blocks"]), positions=pos, spans=over,
                          num_logits=n if logits_all else 1)

    def step(self, *parts, logits_all=True):
        """parts: (sid, n) each; returns each record's logits."""
        recs = [self.record(sid, n, logits_all) for sid, n in parts]
        out = self.runner.run(recs)
        return list(out.split([r.num_logits for r in recs]))

    def push(self, sid, token):
        self.seqs[sid]["ids"].append(token)


def build_prompt(proc, ids_of, images, text_ids):
    """text, then per image <|vision_start|> + its tokens + <|vision_end|> and more text."""
    ids, spans = list(text_ids[:3]), []
    for k, img in enumerate(images):
        p = proc.prepare(img)
        ids.append(ids_of["<|vision_start|>"])
        spans.append(FeatureSpan(start=len(ids), length=p.num_tokens, content_hash=bytes([k]), data=p.data))
        ids += [ids_of["<|image_pad|>"]] * p.num_tokens + [ids_of["<|vision_end|>"]]
        ids += list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


IMAGES = [(50, 20), (13, 30)]        # (width, height): 3 x 7 and 4 x 2 tokens


# --------------------------------------------------------------------------- tower
def test_tower_and_deepstack_match_reference(loaded):
    model, ref, _ = loaded
    grids = [(1, 4, 6), (1, 8, 2), (2, 2, 2), (1, 2, 2)]
    n = sum(t * h * w for t, h, w in grids)
    px = torch.randn(n, 3 * TEMPORAL * PATCH * PATCH, generator=torch.Generator().manual_seed(0))
    inputs = []
    off = 0
    for t, h, w in grids:
        inputs.append(types.SimpleNamespace(patches=px[off:off + t * h * w], grid_thw=(t, h, w)))
        off += t * h * w
    with torch.inference_mode():
        ours = model.image_features(inputs)
        theirs = ref.model.get_image_features(px, torch.tensor(grids))
    assert [o.shape for o in ours] == [(6, 64 * 3), (4, 64 * 3), (2, 64 * 3), (1, 64 * 3)]
    for k, o in enumerate(ours):
        assert max_rel_err(o[:, :64], theirs.pooler_output[k]) <= TOL
        for j in range(len(DEEPSTACK)):
            assert max_rel_err(o[:, 64 * (j + 1):64 * (j + 2)], theirs.deepstack_features[j][k]) <= TOL


# --------------------------------------------------------------------------- logits
@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_and_decode_logits_match_reference(loaded, proc, n_images):
    model, ref, ids_of = loaded
    img_tok = ids_of["<|vision_start|>"]
    g = torch.Generator().manual_seed(n_images)
    images = [image(*IMAGES[0], seed=1), image(*IMAGES[1], seed=2)][:n_images]
    ids, spans = build_prompt(proc, ids_of, images, torch.randint(0, img_tok, (9,), generator=g).tolist())
    if n_images == 2:
        assert spans[0].length != spans[1].length
        assert spans[0].data.grid_thw != spans[1].data.grid_thw
    run = Seqs(model)
    run.add(0, ids, spans)
    worst = max_rel_err(run.step((0, len(ids)))[0], ref_logits(ref, ids, spans))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % img_tok)
        run.push(0, seq[-1])
        worst = max(worst, max_rel_err(run.step((0, 1))[0][-1], ref_logits(ref, seq, spans)[-1]))
    assert worst <= TOL, f"{n_images} image(s): relative logit error {worst:.2e}"


@pytest.mark.parametrize("chunks", [[5, 3, 100], [4, 9, 2, 100], [1, 1, 12, 6, 100]])
def test_prefill_chunked_inside_images_matches_reference(loaded, proc, chunks):
    """Chunk boundaries inside an image: each chunk adds the deepstack features of its own
    slice of the image's rows (computed once, on the first chunk that reaches the image)."""
    model, ref, ids_of = loaded
    g = torch.Generator().manual_seed(7)
    images = [image(*IMAGES[0], seed=3), image(*IMAGES[1], seed=4)]
    ids, spans = build_prompt(proc, ids_of, images, torch.randint(0, 300, (9,), generator=g).tolist())
    want = ref_logits(ref, ids, spans)
    run = Seqs(model)
    run.add(0, ids, spans)
    calls = []
    encode = model.encode_features
    model.encode_features = lambda sp: calls.append(len(sp)) or encode(sp)
    try:
        got, done = [], 0
        for n in chunks:
            n = min(n, len(ids) - done)
            if n <= 0:
                break
            got.append(run.step((0, n))[0])
            done += n
    finally:
        del model.encode_features
    assert sum(calls) == 2                       # each image encoded once
    assert any(s.start < c < s.end for s in spans for c in np.cumsum(chunks))   # a cut inside an image
    assert max_rel_err(torch.cat(got), want) <= TOL


def test_batched_image_and_text_sequences_equal_each_alone(loaded, proc):
    model, _, ids_of = loaded
    g = torch.Generator().manual_seed(12)
    a_ids, a_spans = build_prompt(proc, ids_of, [image(*IMAGES[0], seed=7)],
                                  torch.randint(0, 300, (9,), generator=g).tolist())
    b_ids = torch.randint(0, 300, (13,), generator=g).tolist()
    c_ids, c_spans = build_prompt(proc, ids_of, [image(*IMAGES[1], seed=8), image(*IMAGES[0], seed=7)],
                                  torch.randint(0, 300, (9,), generator=g).tolist())
    alone = []
    for ids, spans in ((a_ids, a_spans), (b_ids, ()), (c_ids, c_spans)):
        run = Seqs(model)
        run.add(0, ids, spans)
        out = [run.step((0, len(ids)))[0]]
        for t in (5, 9):
            run.push(0, t)
            out.append(run.step((0, 1))[0])
        alone.append(torch.cat(out))
    run = Seqs(model)
    for sid, (ids, spans) in enumerate(((a_ids, a_spans), (b_ids, ()), (c_ids, c_spans))):
        run.add(sid, ids, spans)
    # a's prefill in two chunks, the second batched with b's and c's whole prefills
    first = run.step((0, 6))[0]
    rest = run.step((0, len(a_ids) - 6), (1, len(b_ids)), (2, len(c_ids)))
    batched = [torch.cat([first, rest[0]]), rest[1], rest[2]]
    for t in (5, 9):
        for sid in range(3):
            run.push(sid, t)
        for sid, o in enumerate(run.step((0, 1), (1, 1), (2, 1))):
            batched[sid] = torch.cat([batched[sid], o])
    for a, b in zip(alone, batched):
        assert max_rel_err(b, a) <= 1e-5


def test_deepstack_hand_over_is_per_step(loaded, proc):
    """merge_features' deepstack rows reach only the forward of the embeddings it returned: a
    new step (``embed``) drops a left-over, other embeddings are refused, not silently run
    without them."""
    from mistralrs_core.engine.model_runner import build_metadata
    from mistralrs_core.layers.recurrent import make_layer_cache
    model, _, ids_of = loaded
    ids, spans = build_prompt(proc, ids_of, [image(*IMAGES[1], seed=3)], list(range(9)))
    feats = model.encode_features(spans)[0]
    rows = torch.arange(spans[0].start, spans[0].end)
    tok, pos, meta = build_metadata([(ids, 0, list(range(16)))], 4, "cpu")
    pos = torch.from_numpy(model.prompt_positions(ids, spans).positions)
    caches = [make_layer_cache(s, 16, 4, model.dtype, "cpu") for s in model.kv_cache_specs()]
    with torch.inference_mode():
        model.merge_features(model.embed(tok), rows, feats)
        h = model.embed(tok)                                  # a new step: the left-over is gone
        assert model._deepstack is None
        merged = model.merge_features(h, rows, feats)
        with pytest.raises(RuntimeError, match="deepstack features would be lost"):
            model.forward_embeds(merged.clone(), pos, meta, caches)
        assert model._deepstack is None


def test_positions_equal_get_rope_index(loaded, proc):
    model, ref, ids_of = loaded
    ids, spans = build_prompt(proc, ids_of, [image(*IMAGES[0], seed=1), image(*IMAGES[1], seed=2)],
                              list(range(9)))
    pp = model.prompt_positions(ids, spans)
    ids_t = torch.tensor([ids])
    _, grid = _vision_inputs(spans)
    want, delta = ref.model.get_rope_index(ids_t, mm_token_type_ids=(ids_t == ref.config.image_token_id).int(),
                                           image_grid_thw=grid)
    assert np.array_equal(pp.positions, want[:, 0].numpy())
    assert pp.delta == int(delta)
    assert model.prompt_positions(list(range(9)), ()) is None


# --------------------------------------------------------------------------- processor
SHAPES = {"tall": (20, 90), "wide": (120, 14), "small": (5, 3), "large": (300, 200), "exact": (32, 16)}


def _ref_image_processor():
    return transformers.Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items()
                                                     if k != "image_processor_type"})


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_processor_matches_reference(proc, name):
    """Pixels, grid and the placeholder expansion of transformers' ``Qwen3VLProcessor``
    (its method run on a stand-in: an instance needs the torchvision video processor)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as RefProcessor
    img = image(*SHAPES[name], seed=len(name))
    want = _ref_image_processor()([img], return_tensors="pt")
    prepared = proc.prepare(img)
    assert list(prepared.data.grid_thw) == want["image_grid_thw"][0].tolist()
    assert torch.equal(prepared.data.patches, want["pixel_values"])
    stub = types.SimpleNamespace(image_processor=types.SimpleNamespace(merge_size=2), image_token="<|image_pad|>")
    text = RefProcessor.replace_image_token(stub, {"image_grid_thw": want["image_grid_thw"]}, 0)
    assert text == "<|image_pad|>" * prepared.num_tokens


# --------------------------------------------------------------------------- checkpoints and config
def _legacy_copy(tiny, tmp_path, rename):
    """The tiny checkpoint with its tensor names rewritten by ``rename``."""
    from safetensors.torch import load_file, save_file
    out, _, _ = tiny
    for f in out.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update({rename(k): v for k, v in load_file(f).items()})
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_hub_layout_names(tiny):
    from safetensors import safe_open
    out = tiny[0]
    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            names.update(fh.keys())
    assert any(n.startswith("model.language_model.layers.0.self_attn.q_norm") for n in names)
    assert any(n.startswith("model.visual.deepstack_merger_list.1.") for n in names)
    assert "lm_head.weight" in names


@pytest.mark.parametrize("layout", ["qwen2_vl", "vllm"])
def test_other_checkpoint_layouts_load(tiny, loaded, proc, tmp_path, layout):
    model, _, ids_of = loaded

    def rename(k):
        if layout == "qwen2_vl":     # transformers 4's Qwen2-VL layout: model.* text, visual.*
            return k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        return (k.replace("model.language_model.", "language_model.model.").replace("model.visual.", "visual.")
                .replace("lm_head.", "language_model.lm_head."))
    other, _ = build_text_model(_legacy_copy(tiny, tmp_path, rename), kind="vision")
    ids, spans = build_prompt(proc, ids_of, [image(*IMAGES[0], seed=1)], list(range(9)))
    a, b = Seqs(model), Seqs(other)
    a.add(0, ids, spans)
    b.add(0, ids, spans)
    assert torch.equal(a.step((0, len(ids)))[0], b.step((0, len(ids)))[0])


def test_tied_embeddings_match_reference(tmp_path):
    out, ref, ids_of = write_tiny_qwen3_vl(tmp_path, tie=True)
    model, _ = build_text_model(out, kind="vision")
    assert model.cfg.tie_word_embeddings
    p = Qwen2VLProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                         tokenizer=tokenizer_of(ids_of))
    ids, spans = build_prompt(p, ids_of, [image(*IMAGES[1], seed=9)], list(range(9)))
    run = Seqs(model)
    run.add(0, ids, spans)
    assert max_rel_err(run.step((0, len(ids)))[0], ref_logits(ref, ids, spans)) <= TOL


def test_bad_configs_and_inputs_are_clear(tiny, loaded, proc):
    model, _, ids_of = loaded
    hf = json.loads((tiny[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="text_config.model_type"):
        Qwen3VLForConditionalGeneration.from_hf_config({**hf, "text_config": {**hf["text_config"],
                                                                             "model_type": "llama"}})
    with pytest.raises(ValueError, match="out_hidden_size"):
        Qwen3VLForConditionalGeneration.from_hf_config({**hf, "vision_config": {**hf["vision_config"],
                                                                               "out_hidden_size": 32}})
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        Qwen3VLForConditionalGeneration.from_hf_config({**hf, "vision_config": {**hf["vision_config"],
                                                                               "deepstack_visual_indexes": [5]}})
    with pytest.raises(ValueError, match="patch_size 8 does not match"):
        Qwen2VLProcessor.from_pretrained(model=model, hf_config=hf, preprocessor_config={**PREPROCESSOR,
                                                                                          "patch_size": 8},
                                         tokenizer=tokenizer_of(ids_of))
    with pytest.raises(ValueError, match="image_token_id .* is not the tokenizer's"):
        Qwen2VLProcessor.from_pretrained(model=model, hf_config=hf, preprocessor_config=PREPROCESSOR,
                                         tokenizer=types.SimpleNamespace(token_to_id=lambda t: 3))
    bad = types.SimpleNamespace(patches=torch.zeros(6, 3 * TEMPORAL * PATCH * PATCH), grid_thw=(1, 3, 2))
    with pytest.raises(ValueError, match="multiples of the merge size"):
        model.image_features([bad])
    with pytest.raises(ValueError, match="image span of 5 tokens holds a 4 x 4 patch grid"):
        model.prompt_positions(list(range(9)), [FeatureSpan(1, 5, b"x", proc.prepare(image(16, 16)).data)])


# --------------------------------------------------------------------------- through the Runner
@pytest.fixture(scope="module")
def runner(tiny):
    from mistralrs import Runner, VisionArchitecture, Which
    r = Runner(which=Which.VisionPlain(model_id=str(tiny[0]), arch=VisionArchitecture.Qwen3VL, dtype="F32"),
               pa_blk_size=4, seed=0)
    yield r
    r.shutdown()


@torch.inference_mode()
def ref_greedy(ref, ids, spans, n):
    ids, toks, lps, feats = list(ids), [], [], ref_image_features(ref, spans)
    for _ in range(n):
        lp = torch.log_softmax(ref_logits_spans(ref, ids, spans, feats)[-1].double(), -1)
        toks.append(int(lp.argmax()))
        lps.append(float(lp[toks[-1]]))
        ids.append(toks[-1])
    return toks, lps


def _check(pipe, ref, req, res, n=6):
    prompt = pipe.chat_prompt(req)
    toks, lps = ref_greedy(ref, prompt.ids, prompt.spans, n)
    assert res.usage.prompt_tokens == len(prompt.ids)
    assert [e.logprob for e in res.choices[0].logprobs.content] == pytest.approx(lps, abs=1e-4)
    assert res.choices[0].message.content == pipe.tokenizer.decode(toks)
    return prompt


def test_runner_batches_image_and_text_requests(runner, tiny):
    from mistralrs_arch_vision.pipeline import VisionPipeline
    _, ref, ids_of = tiny
    pipe = runner._pipeline(None)
    assert isinstance(pipe, VisionPipeline)
    url_a, url_b = png_data_uri(image(70, 30, seed=5)), png_data_uri(image(20, 45, seed=6))
    reqs = mixed_requests(url_a, url_b)
    steps = pipe.engine.stats["steps"]
    results = run_concurrently(runner, reqs)
    prompts = [_check(pipe, ref, q, res) for q, res in zip(reqs, results)]
    assert [len(p.spans) for p in prompts] == [1, 0, 2]
    a = prompts[0].spans[0]
    assert prompts[0].ids[a.start - 1] == ids_of["<|vision_start|>"]
    assert prompts[0].ids[a.start:a.end] == [ids_of["<|image_pad|>"]] * a.length
    assert prompts[0].ids[a.end] == ids_of["<|vision_end|>"]
    assert pipe.engine.stats["steps"] - steps < 3 * 6          # the requests shared steps


def test_runner_chunked_prefill_inside_an_image_greedy_32(runner, tiny):
    """32 greedy tokens identical to the reference's, the prompt's prefill cut into chunks
    of 5 tokens (several boundaries inside the image)."""
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    sched = pipe.engine.scheduler
    old = sched.max_batch_tokens
    sched.max_batch_tokens = 5
    try:
        req = chat([{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_uri(image(60, 44, seed=8))}}], n=32)
        res = runner.send_chat_completion_request(req)
        prompt = _check(pipe, ref, req, res, n=32)
        assert prompt.spans[0].length > 10
    finally:
        sched.max_batch_tokens = old


def test_runner_bad_image_fails_that_request_only(runner):
    from mistralrs import ChatCompletionRequest
    bad = ChatCompletionRequest(model="default", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]\.image_url"):
        runner.send_chat_completion_request(bad)
    ok = runner.send_chat_completion_request(chat("still fine?", n=2))
    assert ok.usage.completion_tokens == 2


def test_runner_prefix_cache_hit_ending_inside_an_image(runner, tiny):
    """A second request with the same image and other text after it reuses the cached blocks
    of the first up to a block boundary inside the image: the rest of the image's rows (main
    and deepstack features) are computed from its cached features' slice."""
    _, ref, _ = tiny
    pipe = runner._pipeline(None)
    url = png_data_uri(image(40, 24, seed=9))
    first = chat([{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": url}},
                  {"type": "text", "text": "what is it?"}])
    second = chat([{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": "Rust?"}])
    pa, pb = pipe.chat_prompt(first), pipe.chat_prompt(second)
    common = next(i for i, (a, b) in enumerate(zip(pa.ids, pb.ids)) if a != b)
    span = pb.spans[0]
    block = pipe.engine.config.block_size
    assert span.start < common // block * block < span.end       # the hit ends inside the image
    _check(pipe, ref, first, runner.send_chat_completion_request(first))
    before = pipe.engine.stats["prompt_tokens_computed"]
    _check(pipe, ref, second, runner.send_chat_completion_request(second))
    assert pipe.engine.stats["prompt_tokens_computed"] - before == len(pb.ids) - common // block * block
