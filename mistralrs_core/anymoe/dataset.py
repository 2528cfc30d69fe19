"""The gate's training set: upstream's JSON, ``{"rows": [{"prompt": str, "expert": int}]}``.

``expert`` indexes the experts of every AnyMoE layer: 0 is the base model's own MLP, 1.. the
``model_ids`` in order. Rows may carry ``image_urls`` upstream (vision bases); a text base has
nothing to do with them, so they are refused rather than ignored.
"""
from __future__ import annotations

import json
from pathlib import Path

FIELD = "anymoe_config.dataset_json"


def load_rows(path: str, num_experts: int) -> list[tuple[str, int]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{FIELD}: file {path!r} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{FIELD}: {path!r} is not valid JSON ({exc})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f'{FIELD}: {path!r} must be an object {{"rows": [{{"prompt": ..., "expert": ...}}]}}')
    if not rows:
        raise ValueError(f"{FIELD}: {path!r} has no rows to train the gate on")
    out = []
    for i, row in enumerate(rows):
        where = f"{FIELD}: rows[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: must be an object with 'prompt' and 'expert'")
        prompt, expert = row.get("prompt"), row.get("expert")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{where}.prompt: must be a non-empty string")
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < num_experts:
            raise ValueError(f"{where}.expert: must be an integer in 0..{num_experts - 1} (0 is the base "
                             f"model's MLP, 1.. the model_ids in order); got {expert!r}")
        if row.get("image_urls"):
            raise ValueError(f"{where}.image_urls: training the gate on images is not supported")
        out.append((prompt, expert))
    return out
