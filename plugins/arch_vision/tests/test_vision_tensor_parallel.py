"""A vision model under tensor parallelism (2 gloo ranks, processes started here): image
requests and a text request, sent at once to the Runner on rank 0, get the greedy tokens and
log-probs one process gives. Rank 0 runs the towers; the step carries the feature rows (and
Gemma 3's bidirectional spans) to the other rank."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_gemma3 import write_tiny_gemma3
from vision_testing import png_data_uri, random_image

TP_CHILD = Path(__file__).resolve().parents[3] / "tests" / "distributed" / "tp_child.py"
pytestmark = pytest.mark.skipif(not TP_CHILD.is_file(), reason="tests/distributed is not in this checkout")


def _requests() -> list[list[dict]]:
    img = lambda seed, size: {"type": "image_url", "image_url": {"url": png_data_uri(random_image(seed, size))}}  # noqa: E731
    return [[{"role": "user", "content": [img(1, (40, 30)), {"type": "text", "text": "What is this?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "Compare"}, img(2, (28, 28)), img(3, (50, 20))]}],
            [{"role": "user", "content": "Just text, no image."}]]


def test_image_requests_under_tensor_parallelism_answer_as_one_process(tmp_path):
    sys.path.insert(0, str(TP_CHILD.parent))
    import tp_child
    from test_tensor_parallel import _port, _wait
    out, _, _ = write_tiny_gemma3(tmp_path / "gemma3")
    which = {"kind": "VisionPlain", "model_id": str(out), "arch": "Gemma3"}
    spec = {"mode": "chat", "which": which, "requests": _requests(), "out": str(tmp_path / "tp"), "timeout": 60}
    port = _port()
    procs = [subprocess.Popen([sys.executable, str(TP_CHILD), json.dumps({**spec, "rank": r, "world": 2, "port": port})])
             for r in range(2)]
    runner = tp_child.make_runner(dict(which))
    try:
        want = tp_child.chat_answers(runner, _requests())
    finally:
        runner.shutdown()
    _wait(procs, timeout=240)
    got = json.loads((tmp_path / "tp.json").read_text())["answers"]
    for g, w in zip(got, want):
        assert g["text"] == w["text"]
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) <= 1e-4
