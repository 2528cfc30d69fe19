"""Qwen2-VL's video preprocessing against transformers' ``Qwen2VLVideoProcessor``.

That processor runs only on transformers' torchvision backend, and torchvision does not import
here; as in ``test_phi4mm_processor.py`` the reference is transformers' own code run in a
subprocess whose ``torchvision`` is ``torchvision_shim`` (its ``resize`` is the same antialiased
``interpolate`` on uint8 torchvision runs on the CPU). The frame sampling (fps rule, min/max
frames, multiple of the temporal patch), the per-frame ``smart_resize`` (with and without the
per-frame pixel cap), the fused rescale/normalise and the patch order are transformers' code.
Sampled indices, pixel values and grids must be equal, not close. Also: PyAV decoding equals
transformers' PyAV reader, frame lists, bad videos."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_qwen2_vl import MAX_PIXELS, MERGE, MIN_PIXELS, PATCH, PREPROCESSOR, TEMPORAL
from tiny_video import encode_video, random_frames

from mistralrs_arch_vision.inputs import decode_video, load_video, video_url_of
from mistralrs_arch_vision.processors.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

pytest.importorskip("transformers")
pytest.importorskip("av")

_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torchvision_shim
torchvision_shim.install()
import numpy as np
import torch
from safetensors.torch import save_file
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
out = {}
for j, job in enumerate(json.loads(open(sys.argv[2]).read())):
    proc = Qwen2VLVideoProcessor(**job["kwargs"])
    frames = np.load(job["frames"])
    meta = job["meta"]
    res = proc(videos=[frames], video_metadata=[meta] if meta else None, return_tensors="pt",
               return_metadata=True, **job["call"])
    out[f"pixels{j}"] = res["pixel_values_videos"].contiguous()
    out[f"grid{j}"] = res["video_grid_thw"].contiguous()
    m = res["video_metadata"][0]
    idx = m.frames_indices
    out[f"indices{j}"] = torch.as_tensor(idx if idx is not None else range(len(frames))).long().reshape(-1)
    out[f"fps{j}"] = torch.tensor([float(m.sampled_fps)], dtype=torch.float64)
save_file(out, sys.argv[3])
"""

KWARGS = {"patch_size": PATCH, "temporal_patch_size": TEMPORAL, "merge_size": MERGE,
          "image_mean": PREPROCESSOR["image_mean"], "image_std": PREPROCESSOR["image_std"]}


def reference(tmp_path: Path, jobs):
    from safetensors.torch import load_file
    spec = []
    for j, (frames, meta, kwargs, call) in enumerate(jobs):
        np.save(tmp_path / f"frames{j}.npy", frames)
        spec.append({"frames": str(tmp_path / f"frames{j}.npy"), "meta": meta, "kwargs": {**KWARGS, **kwargs},
                     "call": call})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "ref.py").write_text(_SCRIPT)
    res = subprocess.run([sys.executable, str(tmp_path / "ref.py"), str(Path(__file__).parent),
                          str(tmp_path / "spec.json"), str(tmp_path / "ref.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(tmp_path / "ref.safetensors"))


def ours(cfg: dict) -> Qwen2VLVideoProcessor:
    return Qwen2VLVideoProcessor.from_config(cfg, Qwen2VLImageProcessor.from_config(PREPROCESSOR))


# (frames, width, height, source fps, video settings): a 10-fps clip sampled to 2 fps, one
# clamped up to min_frames, an odd frame count, a tall and a wide one, one below the pixel
# floor, one shrunk by the per-frame cap, a 30-fps clip
CASES = [
    (23, 40, 30, 10, {}),
    (5, 24, 24, 10, {}),
    (41, 18, 60, 10, {}),
    (12, 70, 14, 4, {}),
    (9, 6, 7, 2, {}),
    (30, 64, 48, 30, {"cap_pixels_per_frame": True, "max_video_tokens": 40}),
    (61, 33, 21, 30, {"min_frames": 2, "max_frames": 6}),
]


def test_frames_pixels_and_grids_equal_reference(tmp_path):
    """Sampled clips (CASES), then a frame list taken whole (an odd count pads the last
    temporal patch), all in one reference run."""
    jobs, mine = [], []
    for k, (n, w, h, fps, extra) in enumerate(CASES):
        frames = random_frames(n, w, h, seed=k)
        cfg = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, **extra}
        size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
        jobs.append((frames, {"fps": fps, "total_num_frames": n}, {"size": size, **extra},
                     {"do_sample_frames": True, "fps": 2,
                      "cap_pixels_per_frame": extra.get("cap_pixels_per_frame", False)}))
        proc = ours(cfg)
        idx = proc.sample_frames(n, float(fps))
        sampled_fps = len(idx) / n * fps
        mine.append((idx, proc(frames[idx], sampled_fps), sampled_fps))
    listed = random_frames(3, 30, 22, seed=9)
    jobs.append((listed, None, {"size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}},
                 {"do_sample_frames": False}))
    ref = reference(tmp_path, jobs)
    for j, (idx, got, sampled_fps) in enumerate(mine):
        assert idx == ref[f"indices{j}"].tolist(), CASES[j]
        assert list(got.grid_thw) == ref[f"grid{j}"][0].tolist(), CASES[j]
        assert torch.equal(got.patches, ref[f"pixels{j}"]), CASES[j]
        assert sampled_fps == pytest.approx(float(ref[f"fps{j}"]))
        assert got.second_per_grid_t == pytest.approx(TEMPORAL / sampled_fps)
    assert [len(m[0]) for m in mine][:3] == [4, 4, 8]     # 2 fps, min 4 frames, floored to even
    j = len(CASES)
    got = ours({"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})(listed, 2.0)
    assert got.grid_thw[0] == 2 and list(got.grid_thw) == ref[f"grid{j}"][0].tolist()
    assert torch.equal(got.patches, ref[f"pixels{j}"])


def test_pyav_decoding_equals_transformers_reader():
    from transformers.video_utils import read_video_pyav
    import tempfile
    frames = random_frames(17, 32, 24, seed=3)
    data = encode_video(frames, fps=8)
    proc = ours({})
    got = decode_video(data, "v", proc.sample_frames)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        want, meta = read_video_pyav(f.name, sample_indices_fn=lambda metadata, **_: np.asarray(
            proc.sample_frames(metadata.total_num_frames, metadata.fps)))
    assert np.array_equal(got.frames, want)
    assert got.fps == pytest.approx(len(want) / 17 * 8)
    assert got.frames.shape == (4, 24, 32, 3)


def test_video_sources_and_bad_videos(tmp_path):
    import base64
    from PIL import Image
    frames = random_frames(9, 16, 16, seed=4)
    data = encode_video(frames, fps=4)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    proc = ours({})
    kw = dict(sample_frames=proc.sample_frames, fps=2.0)
    by_path = load_video(str(path), where="v", **kw)
    by_uri = load_video("data:video/mp4;base64," + base64.b64encode(data).decode(), where="v", **kw)
    assert by_path.content_hash == by_uri.content_hash and np.array_equal(by_path.frames, by_uri.frames)
    # a frame list: the images as given, at the part's rate
    pngs = []
    for k in range(3):
        pngs.append(str(tmp_path / f"f{k}.png"))
        Image.fromarray(frames[k]).save(pngs[-1])
    listed = load_video(pngs, where="v", **kw)
    assert np.array_equal(listed.frames, frames[:3]) and listed.fps == 2.0
    assert load_video(pngs, where="v", sample_frames=proc.sample_frames, fps=1.0).content_hash != listed.content_hash
    assert video_url_of({"video_url": {"url": pngs, "fps": 1}}, "v") == (pngs, 1.0)
    where = "messages[0].content[1].video_url"
    pattern = re.escape(where)
    Image.fromarray(frames[0][:8]).save(tmp_path / "small.png")
    for bad, match in [(b"not a video" * 50, "not a decodable video"), (b"", "not a decodable video")]:
        (tmp_path / "bad.mp4").write_bytes(bad)
        with pytest.raises(ValueError, match=rf"^{pattern}: {match}"):
            load_video(str(tmp_path / "bad.mp4"), where=where, **kw)
    with pytest.raises(ValueError, match="different sizes"):
        load_video(pngs + [str(tmp_path / "small.png")], where=where, **kw)
    with pytest.raises(ValueError, match=rf"^{pattern}: fps must be"):
        video_url_of({"video_url": {"url": pngs, "fps": 0}}, where)
    with pytest.raises(ValueError, match=rf"^{pattern}: a frame list"):
        video_url_of({"video_url": {"url": []}}, where)
