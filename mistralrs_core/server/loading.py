"""Load model specs into one Runner behind a progress bar on stderr."""
from __future__ import annotations

import sys
import threading

from tqdm import tqdm

from mistralrs_core import progress as progress_setting
from mistralrs_core.server.spec import ModelSpec


def build_runner(specs: list[ModelSpec], runtime: dict, *, progress: bool | None = None):
    """A Runner holding every spec (in order; the spec marked default, else the first, is
    the default model). ``runtime`` are Runner keyword arguments; a spec's options
    override them for that model only. ``progress``: the models bar (None: as the Runner's
    ``progress`` option in ``runtime``, else MISTRALRS_PROGRESS, else only on a terminal)."""
    from mistralrs_core.runner import Runner

    runner = Runner(which=[], **runtime)
    with tqdm(total=len(specs), desc="Loading", unit="model", file=sys.stderr, disable=not progress_setting.enabled(runtime.get("progress") if progress is None else progress),
              bar_format="{desc}: {n_fmt}/{total_fmt} models [{elapsed}]{postfix}") as bar:
        # A single load gives no progress callbacks; ticking keeps the elapsed time moving
        # so a long load does not look hung.
        done = threading.Event()

        def tick() -> None:
            while not done.wait(0.5):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            for spec in specs:
                bar.set_postfix_str(spec.label)
                runner.add_model(spec.which, model_id=spec.model_id, default=spec.default, **spec.options)
                bar.update(1)
            bar.set_postfix_str("done")
        except BaseException:
            runner.shutdown()
            raise
        finally:
            done.set()
            ticker.join()
    return runner
