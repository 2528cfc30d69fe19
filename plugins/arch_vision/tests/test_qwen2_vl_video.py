"""Qwen2-VL and Qwen2.5-VL with video against transformers (tiny, every parameter perturbed):
M-RoPE positions of video spans against ``get_rope_index`` (Qwen2.5-VL's seconds-scaled
temporal axis with a non-integer interval), prefill + cached decode logits (against the
reference's own cached forward and ``RefSpans``, which the Runner checks use) for a video alone
and a video with an image, then the Runner: a video request (an mp4 data URI) batched with a text
request and an image + frame-list request, and a bad video failing only its own request."""
import base64
import threading

import numpy as np
import pytest
import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.testing.parity import max_rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("av")

from test_mistral3 import image  # noqa: E402
from test_qwen2_vl import Ours, processor, runner, tiny  # noqa: E402,F401  (fixtures reused)
from tiny_qwen2_vl import MAX_PIXELS, MIN_PIXELS  # noqa: E402
from tiny_video import encode_video, random_frames  # noqa: E402
from vision_testing import chat, png_data_uri, run_concurrently  # noqa: E402

from mistralrs_arch_vision.processors.qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402

COVERS = ["Qwen2VL", "Qwen2_5VL"]
TOL = 1e-4


def video_processor():
    return Qwen2VLVideoProcessor.from_config({"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}, processor())


def build_prompt(items, text_ids, ids_of):
    """Text, then each item's run followed by more text. Items: ("image", PIL image) or
    ("video", uint8 frames, fps)."""
    ids, spans = list(text_ids[:3]), []
    for k, item in enumerate(items):
        if item[0] == "image":
            data, token = processor()(item[1]), ids_of["<|image_pad|>"]
        else:
            data, token = video_processor()(item[1], item[2]), ids_of["<|video_pad|>"]
        n = processor().num_tokens(data.grid_thw)
        spans.append(FeatureSpan(start=len(ids), length=n, content_hash=bytes([k]), data=data))
        ids += [token] * n + list(text_ids[3 + 2 * k: 5 + 2 * k])
    return ids + list(text_ids[-2:]), spans


def type_ids(n, spans):
    mm = torch.zeros(1, n, dtype=torch.long)
    for s in spans:
        mm[0, s.start:s.end] = 2 if s.data.is_video else 1
    return mm


def ref_inputs(spans, qwen25):
    kw = {}
    images = [s.data for s in spans if not s.data.is_video]
    videos = [s.data for s in spans if s.data.is_video]
    if images:
        kw.update(pixel_values=torch.cat([d.patches for d in images]),
                  image_grid_thw=torch.tensor([list(d.grid_thw) for d in images]))
    if videos:
        kw.update(pixel_values_videos=torch.cat([d.patches for d in videos]),
                  video_grid_thw=torch.tensor([list(d.grid_thw) for d in videos]))
        if qwen25:
            # as the processor returns it (a list of floats -> a float32 tensor)
            kw["second_per_grid_ts"] = torch.tensor([d.second_per_grid_t for d in videos])
    return kw


def rope_kw(kw):
    return {k: kw[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in kw}


@torch.inference_mode()
def ref_logits(ref, ids, spans, qwen25):
    return ref(input_ids=torch.tensor([ids]), mm_token_type_ids=type_ids(len(ids), spans),
               **ref_inputs(spans, qwen25)).logits[0].float()


class RefSpans:
    """The reference fed embeddings (each span's tower features spliced in) with its own
    ``get_rope_index`` positions for the prompt and, for tokens after it, index + its
    ``rope_deltas`` on every axis, as its ``generate`` places them through the cache. (Run
    from scratch over prompt + generated tokens, ``get_rope_index`` would instead count the
    generated tokens on from the last text position: different when a video's scaled temporal
    axis reaches past it.)"""

    @torch.inference_mode()
    def __init__(self, ref, spans, qwen25, prompt_ids):
        self.ref, self.spans, self.kw = ref, spans, ref_inputs(spans, qwen25)
        self.n = len(prompt_ids)
        if spans:
            self.pos, self.delta = ref.model.get_rope_index(torch.tensor([prompt_ids]), type_ids(self.n, spans),
                                                            **rope_kw(self.kw))
        self.feats = []
        for s in spans:
            d, grid = s.data, torch.tensor([list(s.data.grid_thw)])
            out = (ref.model.get_video_features(pixel_values_videos=d.patches, video_grid_thw=grid) if d.is_video
                   else ref.model.get_image_features(pixel_values=d.patches, image_grid_thw=grid))
            self.feats.append(out.pooler_output[0])

    @torch.inference_mode()
    def logits(self, ids):
        h = self.ref.get_input_embeddings()(torch.tensor([ids]))
        pos = None
        if self.spans:
            for s, f in zip(self.spans, self.feats):
                h[0, s.start:s.end] = f
            after = (torch.arange(self.n, len(ids)) + int(self.delta)).view(1, 1, -1).expand(3, 1, -1)
            pos = torch.cat([self.pos, after], dim=-1)
        return self.ref(inputs_embeds=h, position_ids=pos).logits[0].float()


# (frames, width, height, fps): 3 fps makes Qwen2.5-VL's temporal interval 4 * 2/3 (truncated)
CLIP = (random_frames(8, 40, 24, seed=1), 3.0)
ITEMS = {
    "video": [("video", *CLIP)],
    "video+image": [("image", image(13, 30, seed=2)), ("video", random_frames(5, 18, 30, seed=3), 2.0)],
}


@pytest.mark.parametrize("case", list(ITEMS))
def test_positions_match_get_rope_index(tiny, case):
    _, ref, ids_of, model = tiny
    ids, spans = build_prompt(ITEMS[case], list(range(20, 40)), ids_of)
    got = model.prompt_positions(ids, spans)
    want, delta = ref.model.get_rope_index(torch.tensor([ids]), type_ids(len(ids), spans),
                                           **rope_kw(ref_inputs(spans, model.qwen25)))
    assert got.positions.tolist() == want[:, 0].tolist()
    assert got.delta == int(delta)
    video = next(s for s in spans if s.data.is_video)
    t_axis = sorted(set(got.positions[0, video.start:video.end].tolist()))
    if case == "video" and model.qwen25:
        assert np.diff(t_axis).tolist() == [2, 3, 3]          # int(k * 8/3): 0, 2, 5, 8
    elif case == "video":
        assert np.diff(t_axis).tolist() == [1, 1, 1]


@pytest.mark.parametrize("case", list(ITEMS))
def test_prefill_and_decode_logits_match_reference(tiny, case):
    _, ref, ids_of, model = tiny
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, ids_of["<|vision_start|>"], (9,), generator=g).tolist()
    ids, spans = build_prompt(ITEMS[case], text, ids_of)
    run, reference = Ours(model), RefSpans(ref, spans, model.qwen25, ids)
    # the reference's own cached decoding (its rope_deltas path), step by step as generate runs it
    with torch.inference_mode():
        out = ref(input_ids=torch.tensor([ids]), mm_token_type_ids=type_ids(len(ids), spans), use_cache=True,
                  **ref_inputs(spans, model.qwen25))
    worst = max_rel_err(run.step(ids, spans), out.logits[0].float())
    seq, cache = list(ids), out.past_key_values
    for i in range(4):
        seq.append((seq[-1] * 7 + 3 + i) % ids_of["<|vision_start|>"])
        with torch.inference_mode():
            out = ref(input_ids=torch.tensor([seq[-1:]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        mine = run.step(seq[-1:])[-1]
        worst = max(worst, max_rel_err(mine, out.logits[0, -1].float()),
                    max_rel_err(mine, reference.logits(seq)[-1]))
    assert worst <= TOL, f"{case}: relative logit error {worst:.2e}"


# --------------------------------------------------------------------------- through the Runner
@torch.inference_mode()
def check(pipe, ref, qwen25, req, res, n=6):
    prompt = pipe.chat_prompt(req)
    ids, toks, lps = list(prompt.ids), [], []
    reference = RefSpans(ref, prompt.spans, qwen25, ids)
    for _ in range(n):
        lp = torch.log_softmax(reference.logits(ids)[-1].double(), -1)
        toks.append(int(lp.argmax()))
        lps.append(float(lp[toks[-1]]))
        ids.append(toks[-1])
    assert res.usage.prompt_tokens == len(prompt.ids)
    assert [e.logprob for e in res.choices[0].logprobs.content] == pytest.approx(lps, abs=1e-4)
    assert res.choices[0].message.content == pipe.tokenizer.decode(toks)
    return prompt


def mp4_uri(frames, fps):
    return "data:video/mp4;base64," + base64.b64encode(encode_video(frames, fps=fps)).decode()


def test_runner_batches_video_and_text_requests(runner, tiny):
    _, ref, _, model = tiny
    pipe = runner._pipeline(None)
    frames = [png_data_uri(image(20, 14, seed=k)) for k in range(3)]
    reqs = [chat([{"type": "text", "text": "What happens?"},
                  {"type": "video_url", "video_url": {"url": mp4_uri(random_frames(13, 32, 24, seed=5), 6)}}]),
            chat("Tell me a story about the Rust type system."),
            chat([{"type": "image_url", "image_url": {"url": png_data_uri(image(30, 20, seed=6))}},
                  {"type": "text", "text": "then"}, {"type": "video_url", "video_url": {"url": frames, "fps": 1}}])]
    alone = [runner.send_chat_completion_request(q) for q in reqs]
    together = run_concurrently(runner, reqs)
    prompts = [check(pipe, ref, model.qwen25, q, res) for q, res in zip(reqs, together)]
    assert [[s.data.is_video for s in p.spans] for p in prompts] == [[True], [], [False, True]]
    assert prompts[0].spans[0].data.grid_thw[0] == 2              # 13 frames at 6 fps -> 4 frames
    assert prompts[2].spans[1].data.second_per_grid_t == 2.0       # 2 frames a patch at 1 fps
    for a, b in zip(alone, together):
        assert a.choices[0].message.content == b.choices[0].message.content


def test_runner_bad_video_fails_only_its_request(runner, tiny):
    _, ref, _, model = tiny
    pipe = runner._pipeline(None)
    bad = chat([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"
                                                   + base64.b64encode(b"not a video" * 40).decode()}}])
    good = chat("Hello there", n=24)
    results = []
    worker = threading.Thread(target=lambda: results.append(runner.send_chat_completion_request(good)))
    worker.start()                                # the good request is in flight while the bad one fails
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\]\.video_url: not a decodable video"):
        runner.send_chat_completion_request(bad)
    worker.join(timeout=120)
    assert len(results) == 1
    check(pipe, ref, model.qwen25, good, results[0], n=24)
    check(pipe, ref, model.qwen25, good, runner.send_chat_completion_request(good), n=24)


def test_video_refused_where_not_taken(runner, tiny):
    import attrs
    from mistralrs_arch_vision.inputs import LoadedVideo
    from mistralrs_arch_vision.qwen2_vl import Qwen2VLProcessor
    _, _, ids_of, model = tiny
    pipe = runner._pipeline(None)
    part = {"type": "video_url", "video_url": {"url": mp4_uri(random_frames(4, 16, 16), 2)}}
    old = pipe.processor
    try:
        pipe.processor = attrs.evolve(old, video_token_id=None)     # what an image-only export loads as
        with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[1\]\.video_url: this model does not take "
                                             r"video input"):
            pipe.chat_prompt(chat([{"type": "text", "text": "hi"}, part]))
    finally:
        pipe.processor = old
    # a template that writes no video placeholder is named, not silently dropped
    clip = LoadedVideo(random_frames(2, 16, 16), 2.0, b"x")
    with pytest.raises(ValueError, match=r"0 video placeholder\(s\) for 1 video part\(s\)"):
        pipe.expand_media([1, 2, 3], [], [], [clip])
    # a tokenizer without <|video_pad|> loads an image-only processor
    no_video = type("Tok", (), {"token_to_id": staticmethod(lambda t: None if t == "<|video_pad|>" else ids_of[t])})()
    from tiny_qwen2_vl import PREPROCESSOR
    proc = Qwen2VLProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                            tokenizer=no_video)
    assert proc.video_token_id is None and proc.video_processor is None
    # a model sharing the processor without Qwen2-VL's video placement (Qwen3-VL) gets none either
    tok = type("Tok", (), {"token_to_id": staticmethod(ids_of.get)})()
    assert Qwen2VLProcessor.from_pretrained(model=model, hf_config={}, preprocessor_config=PREPROCESSOR,
                                            tokenizer=tok).video_token_id == ids_of["<|video_pad|>"]
    other = type("Other", (), {"image_token_id": model.image_token_id, "visual": model.visual})()
    assert Qwen2VLProcessor.from_pretrained(model=other, hf_config={}, preprocessor_config=PREPROCESSOR,
                                            tokenizer=tok).video_token_id is None


def test_image_only_use_never_imports_av(tmp_path):
    import subprocess
    import sys
    code = ("import sys; from PIL import Image; "
            "from mistralrs_arch_vision import pipeline, qwen2_vl, inputs; "
            "from mistralrs_arch_vision.processors.qwen2_vl import Qwen2VLImageProcessor; "
            "Qwen2VLImageProcessor(patch_size=4)(Image.new('RGB', (20, 20))); "
            "assert 'av' not in sys.modules, 'av imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


_HF_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torchvision_shim
torchvision_shim.install()
import numpy as np
from PIL import Image
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from tiny_qwen2_vl import MAX_PIXELS, MIN_PIXELS, PREPROCESSOR, TEMPLATE
job = json.loads(open(sys.argv[2]).read())
settings = {k: v for k, v in PREPROCESSOR.items() if not k.endswith(("_type", "_class"))}
vp = Qwen2VLVideoProcessor(**{k: v for k, v in settings.items() if k not in ("min_pixels", "max_pixels")},
                           size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
hf = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**settings), video_processor=vp,
                         tokenizer=PreTrainedTokenizerFast(tokenizer_file=job["tokenizer"]), chat_template=TEMPLATE)
text = hf.apply_chat_template([{"role": "user", "content": job["content"]}], add_generation_prompt=True,
                              tokenize=False)
out = hf(text=[text], images=[Image.open(job["image"])], videos=[np.load(job["video"])],
         video_metadata=[job["meta"]], do_sample_frames=True, fps=2, cap_pixels_per_frame=False,
         return_tensors="pt")
save_file({k: out[k].contiguous() for k in ("input_ids", "mm_token_type_ids", "pixel_values",
                                             "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")},
          sys.argv[3])
"""


# One processor serves both families; Qwen2.5-VL's also returns second_per_grid_ts, so it is
# the one checked.
@pytest.mark.parametrize("tiny", ["qwen25"], indirect=True)
def test_prompt_expansion_equals_transformers_processor(runner, tiny, tmp_path):
    """Our pipeline's prompt for an image + an mp4 against transformers' ``Qwen2_5_VLProcessor``
    (PIL image processor, torchvision-shimmed video processor, in a subprocess) given the same
    decoded frames: ids, token types, pixels, grids and seconds per temporal patch."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    from safetensors.torch import load_file
    from mistralrs_arch_vision.inputs import decode_video
    out, model = tiny[0], tiny[3]
    pipe = runner._pipeline(None)
    data = encode_video(random_frames(19, 36, 28, seed=8), fps=7)
    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    img = image(30, 20, seed=6)
    prompt = pipe.chat_prompt(chat([{"type": "text", "text": "Look"},
                                    {"type": "image_url", "image_url": {"url": png_data_uri(img)}},
                                    {"type": "video_url", "video_url": {"url": uri}}]))
    everything = decode_video(data, "v", lambda total, fps: list(range(total)))
    np.save(tmp_path / "video.npy", everything.frames)
    img.save(tmp_path / "image.png")
    job = {"tokenizer": str(out / "tokenizer.json"), "image": str(tmp_path / "image.png"),
           "video": str(tmp_path / "video.npy"),
           "meta": {"fps": float(everything.fps), "total_num_frames": len(everything.frames)},
           "content": [{"type": "text", "text": "Look"}, {"type": "image"}, {"type": "video"}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "ref.py").write_text(_HF_SCRIPT)
    res = subprocess.run([sys.executable, str(tmp_path / "ref.py"), str(Path(__file__).parent),
                          str(tmp_path / "job.json"), str(tmp_path / "ref.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    want = load_file(str(tmp_path / "ref.safetensors"))
    assert list(prompt.ids) == want["input_ids"][0].tolist()
    assert type_ids(len(prompt.ids), prompt.spans)[0].tolist() == want["mm_token_type_ids"][0].tolist()
    image_span, video_span = prompt.spans
    assert torch.equal(image_span.data.patches, want["pixel_values"])
    assert torch.equal(video_span.data.patches, want["pixel_values_videos"])
    assert list(video_span.data.grid_thw) == want["video_grid_thw"][0].tolist()
    assert video_span.data.second_per_grid_t == pytest.approx(float(want["second_per_grid_ts"][0]))
