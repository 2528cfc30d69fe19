"""Mllama (VLlama) against transformers' ``MllamaForConditionalGeneration`` (tiny, every
parameter perturbed): the tiling processor, prefill + cached decode logits with 0 and 1
image (the image's K/V live in the cross layers' state-slot caches), and slot reuse."""

import pytest
import torch

from mistralrs_core.engine.model_runner import ModelRunner
from mistralrs_core.engine.step import FeatureSpan, record
from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")

from tiny_mllama import MAX_TILES, PREPROCESSOR, TILE, write_tiny_mllama  # noqa: E402

from mistralrs_arch_vision.mllama import MllamaImageData  # noqa: E402
from mistralrs_arch_vision.processors.mllama import MllamaImageProcessor  # noqa: E402
from vision_testing import png_data_uri, random_image, run_concurrently  # noqa: E402

COVERS = ["VLlama"]
TOL = 1e-4
SHAPES = [(37, 29), (9, 40), (60, 13), (5, 6), (14, 14), (100, 30)]   # (width, height)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_mllama(tmp_path_factory.mktemp("tiny_mllama"))


@pytest.fixture(scope="module")
def loaded(tiny):
    out, ref, image_token = tiny
    model, _ = build_text_model(out, kind="vision")
    return model, ref, image_token


@pytest.mark.parametrize("size", SHAPES)
def test_processor_matches_reference(size):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    cfg = {k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"}
    theirs = MllamaImageProcessorPil(**cfg)(random_image(3, size), return_tensors="pt")
    ours = MllamaImageProcessor.from_config(PREPROCESSOR)(random_image(3, size))
    assert ours.num_tiles == theirs["num_tiles"][0][0]
    assert ours.aspect_ratio_id == int(theirs["aspect_ratio_ids"][0, 0])
    assert torch.equal(ours.tile_mask, theirs["aspect_ratio_mask"][0, 0].long())
    assert ours.pixel_values.shape == (MAX_TILES, 3, TILE, TILE)
    assert torch.allclose(ours.pixel_values, theirs["pixel_values"][0, 0].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tiles,size,mode", [(1, (37, 29), "RGB"), (2, (9, 40), "L"), (6, (100, 30), "RGBA"),
                                             (6, (31, 33), "RGB")])
def test_processor_tile_budgets_and_modes(tiles, size, mode):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    cfg = {**{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"}, "max_image_tiles": tiles}
    img = random_image(4, size).convert(mode)
    theirs = MllamaImageProcessorPil(**cfg)(img, return_tensors="pt")
    ours = MllamaImageProcessor.from_config(cfg)(img)
    assert ours.aspect_ratio_id == int(theirs["aspect_ratio_ids"][0, 0])
    assert torch.equal(ours.tile_mask, theirs["aspect_ratio_mask"][0, 0].long())
    assert torch.allclose(ours.pixel_values, theirs["pixel_values"][0, 0].float(), atol=1e-6, rtol=0)


class Ours:
    """One sequence in state slot ``slot`` through the core's ModelRunner: its images are
    admitted on its first step (``admit_features``), whatever rows that step computes."""

    def __init__(self, model, slot=0, spans=(), block_size=4, num_blocks=64):
        self.runner = ModelRunner(model, num_blocks, block_size, "cpu", model.dtype, num_state_slots=8)
        self.slot, self.spans, self.pos = slot, tuple(spans), 0
        self.blocks = list(range(num_blocks))

    @torch.inference_mode()
    def step(self, ids):
        rec = record(ids, self.pos, self.blocks, state_slot=self.slot, fresh_slot=self.pos == 0,
                     spans=self.spans, num_logits=len(ids))
        self.pos += len(ids)
        return self.runner.run([rec])


def image_inputs(seed, size):
    px = MllamaImageProcessor.from_config(PREPROCESSOR)(random_image(seed, size))
    return px, MllamaImageData(px.pixel_values, px.aspect_ratio_id, px.tile_mask)


@torch.inference_mode()
def ref_logits(ref, ids, pxs, image_token):
    """transformers' full forward, the cross-attention mask built by its processor's own
    helpers from the image tokens' places and tile counts."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)
    kw = {}
    if pxs:
        # The last image's range runs to the end: generated tokens extend the last prompt
        # row, as transformers' generate does (the vocabulary stops before the image token).
        places = get_cross_attention_token_mask(ids, image_token)
        assert len(places) == len(pxs)
        mask = convert_sparse_cross_attention_mask_to_dense(
            [places], [[int(p.tile_mask.sum()) for p in pxs]], MAX_TILES, len(ids))
        kw = dict(pixel_values=torch.stack([p.pixel_values for p in pxs])[None],
                  aspect_ratio_ids=torch.tensor([[p.aspect_ratio_id for p in pxs]]),
                  aspect_ratio_mask=torch.stack([p.tile_mask for p in pxs])[None],
                  cross_attention_mask=torch.from_numpy(mask))
    return ref(input_ids=torch.tensor([ids]), **kw).logits[0].float()


CASES = {"text": [], "one": [(37, 29)], "one_tall": [(9, 40)], "two": [(37, 29), (60, 13)],
         "two_adjacent": [(20, 20), (9, 40)]}


def prompt_with_images(image_token, sizes, text, adjacent=False, lead=3):
    ids, spans, pxs = list(text[:lead]), [], []
    for k, size in enumerate(sizes):
        px, data = image_inputs(7 + k, size)
        pxs.append(px)
        spans.append(FeatureSpan(start=len(ids), length=1, content_hash=bytes([k]), data=data))
        ids += [image_token] + ([] if adjacent and k + 1 < len(sizes) else list(text[3 + 2 * k:5 + 2 * k]))
    return ids + list(text[-2:]), spans, pxs


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_logits_match_reference(loaded, case):
    model, ref, image_token = loaded
    g = torch.Generator().manual_seed(len(case))
    text = torch.randint(0, image_token, (9,), generator=g).tolist()
    ids, spans, pxs = prompt_with_images(image_token, CASES[case], text, adjacent=case == "two_adjacent")
    run = Ours(model, slot=1, spans=spans)
    worst = max_rel_err(run.step(ids), ref_logits(ref, ids, pxs, image_token))
    seq = list(ids)
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % image_token)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq, pxs, image_token)[-1]))
    assert worst <= TOL, f"{case}: relative logit error {worst:.2e}"
    if pxs:  # the images matter: without them the logits are far off
        assert max_rel_err(ref_logits(ref, seq, [], image_token), ref_logits(ref, seq, pxs, image_token)) > 0.05


def chunked_two_images(model, ref, image_token, lead):
    """Prefill in two chunks, the second image a step after the first (added to the keys
    its slot holds)."""
    ids, spans, pxs = prompt_with_images(image_token, CASES["two"], list(range(20, 29)), lead=lead)
    cut = spans[1].start - 1
    run = Ours(model, slot=0, spans=spans)
    first = run.step(ids[:cut])
    rest = run.step(ids[cut:])
    return max_rel_err(torch.cat([first, rest]), ref_logits(ref, ids, pxs, image_token))


def test_images_in_separate_prefill_chunks(loaded):
    """The prompt opens with an image, so no token sees an image it does not follow."""
    assert chunked_two_images(*loaded, lead=0) <= TOL


def test_text_before_the_images_with_a_later_image_chunk(loaded):
    """Text before the first image attends every image's keys, so the images are admitted
    on the sequence's first step, before the chunk that holds them."""
    assert chunked_two_images(*loaded, lead=3) <= TOL


def test_fresh_slot_forgets_previous_image(loaded):
    """A text-only sequence admitted into the slot an image sequence used sees no image."""
    model, ref, image_token = loaded
    px, data = image_inputs(11, (30, 20))
    ids = [5, 6, image_token, 7, 8]
    Ours(model, slot=2, spans=(FeatureSpan(start=2, length=1, content_hash=b"y", data=data),)).step(ids)
    text = [9, 10, 11, 12]
    out = Ours(model, slot=2).step(text)
    assert max_rel_err(out, ref_logits(ref, text, [], image_token)) <= TOL


# --------------------------------------------------------------------------- through the Runner
def chat(parts, n=5):
    from mistralrs import ChatCompletionRequest
    return ChatCompletionRequest(model="default", messages=[{"role": "user", "content": parts}],
                                 max_tokens=n, temperature=0.0, logprobs=True, ignore_eos=True)


@torch.inference_mode()
def ref_greedy(ref, prompt, image_token, n):
    pxs = [s.data for s in prompt.spans]
    ids, toks, lps = list(prompt.ids), [], []
    for _ in range(n):
        lp = torch.log_softmax(ref_logits(ref, ids, pxs, image_token)[-1].double(), -1)
        t = int(lp.argmax())
        toks.append(t)
        lps.append(float(lp[t]))
        ids.append(t)
    return toks, lps


def check_against_reference(pipe, ref, image_token, req, res, n=5):
    prompt = pipe.chat_prompt(req)
    want_toks, want_lps = ref_greedy(ref, prompt, image_token, n)
    assert res.usage.prompt_tokens == len(prompt.ids)
    assert [e.logprob for e in res.choices[0].logprobs.content] == pytest.approx(want_lps, abs=1e-4)
    assert res.choices[0].message.content == pipe.tokenizer.decode(want_toks)
    return prompt


def make_runner(tiny, **kw):
    from mistralrs import Runner, VisionArchitecture, Which
    out, _, _ = tiny
    return Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.VLlama, dtype="F32"),
                  pa_blk_size=4, seed=0, max_seqs=2, **kw)


@pytest.fixture(scope="module")
def runner(tiny):
    # The default prefix cache is on: blocks before an image are keyed by it (the engine puts
    # every image digest of a slot-state model into the first block's salt), and a hit past
    # the image token still admits the image (ModelRunner._admit).
    r = make_runner(tiny)
    yield r
    r.shutdown()


@pytest.fixture(scope="module")
def cached_runner(tiny):
    r = make_runner(tiny)
    yield r
    r.shutdown()


def send_together(runner, reqs):
    results = run_concurrently(runner, reqs)
    return results


def test_runner_batches_image_and_text_then_reuses_slots(runner, tiny):
    """An image request and a text request share steps; then two text requests take both
    state slots (max_seqs=2), one of them the image's, and must not see that image."""
    _, ref, image_token = tiny
    pipe = runner._pipeline(None)
    url = png_data_uri(random_image(5, (40, 17)))
    first = [chat([{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": "in words."}]),
             chat("Tell me a story about the Rust type system.")]
    steps = pipe.engine.stats["steps"]
    prompts = [check_against_reference(pipe, ref, image_token, q, r)
               for q, r in zip(first, send_together(runner, first))]
    assert [len(p.spans) for p in prompts] == [1, 0]
    assert prompts[0].ids.count(image_token) == 1
    assert pipe.engine.stats["steps"] - steps < 2 * 5          # the requests shared steps
    second = [chat("What is a borrow checker?"), chat("Lifetimes, explained briefly, please.")]
    for q, r in zip(second, send_together(runner, second)):
        check_against_reference(pipe, ref, image_token, q, r)
    two = chat([{"type": "image_url", "image_url": {"url": png_data_uri(random_image(6, (12, 50)))}},
                {"type": "text", "text": "versus"}, {"type": "image_url", "image_url": {"url": url}}])
    assert len(check_against_reference(pipe, ref, image_token, two, runner.send_chat_completion_request(two)).spans) == 2


def test_hub_checkpoint_layout_loads(tmp_path, tiny, loaded):
    """Released checkpoints name the text model ``language_model.model.*`` and the tower
    ``vision_model.*``; transformers 5 saves ``model.language_model.*``: both load alike."""
    from safetensors.torch import load_file, save_file
    model, ref, image_token = loaded
    out, _, _ = tiny
    hub = tmp_path / "hub"
    hub.mkdir()
    for f in out.iterdir():
        if f.name != "model.safetensors":
            (hub / f.name).write_bytes(f.read_bytes())
    renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_model.", "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."))
    weights = {}
    for k, v in load_file(str(out / "model.safetensors")).items():
        for a, b in renames:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        weights[k] = v
    assert any(k.startswith("language_model.model.") for k in weights)
    save_file(weights, str(hub / "model.safetensors"))
    hub_model, _ = build_text_model(hub, kind="vision")
    ids, spans, _ = prompt_with_images(image_token, CASES["one"], list(range(30, 39)))
    _, spans_again, _ = prompt_with_images(image_token, CASES["one"], list(range(30, 39)))
    assert torch.equal(Ours(hub_model, slot=0, spans=spans).step(ids),
                       Ours(model, slot=3, spans=spans_again).step(ids))


def test_text_sharing_a_prefix_with_an_image_prompt(cached_runner, tiny):
    """Text before the image token attends the image (transformers' masked-out rows see all
    keys), so those blocks must not serve a text-only request with the same text."""
    _, ref, image_token = tiny
    pipe = cached_runner._pipeline(None)
    url = png_data_uri(random_image(8, (22, 31)))
    words = "Describe this picture in great detail, please"
    img = chat([{"type": "text", "text": words}, {"type": "image_url", "image_url": {"url": url}}])
    check_against_reference(pipe, ref, image_token, img, cached_runner.send_chat_completion_request(img))
    text = chat(words + " and also tell me a story.")
    check_against_reference(pipe, ref, image_token, text, cached_runner.send_chat_completion_request(text))


def test_repeated_image_prompt_hits_past_the_image(cached_runner, tiny):
    """The second request's prefix hit covers the image token: its step never merges the
    image, so its fresh slot has no image K/V."""
    _, ref, image_token = tiny
    pipe = cached_runner._pipeline(None)
    url = png_data_uri(random_image(9, (50, 12)))
    req = chat([{"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in this picture? Say it in many words."}])
    prompt = check_against_reference(pipe, ref, image_token, req, cached_runner.send_chat_completion_request(req))
    hits = pipe.engine.blocks.hits
    res = cached_runner.send_chat_completion_request(req)
    assert pipe.engine.blocks.hits - hits > prompt.spans[0].start      # the hit covers the image token
    check_against_reference(pipe, ref, image_token, req, res)
