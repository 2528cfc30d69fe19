"""The ISQ progress bar: the core's ``progress.bar`` when this core has it, else tqdm
shown only on a terminal (so logs and pipes stay clean)."""
from __future__ import annotations

import sys


def bar(total: int, desc: str):
    try:
        from mistralrs_core import progress
    except ImportError:
        progress = None
    if progress is not None and hasattr(progress, "bar"):
        return progress.bar(total=total, desc=desc, unit="layer")
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="layer", disable=not sys.stderr.isatty(), leave=False)
