"""Helpers for tests of request batching."""
from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def submitted_together(engine, n: int, timeout: float = 60.0):
    """Within the block, the engine's first ``n`` submissions are held and handed to it in
    one go once the ``n``-th arrives (or ``timeout`` seconds after the first), so a test that
    batching happens does not depend on the request threads' timing: on a loaded machine one
    request could otherwise run to its end before the next thread submits."""
    submit = engine.submit
    held: list = []
    lock = threading.Lock()
    timer: list[threading.Timer] = []

    def flush():
        with lock:
            groups, held[:] = list(held), []
            if timer:
                timer[0].cancel()
        for g in groups:
            submit(g)

    def hold(group):
        with lock:
            if len(held) == 0 and not timer:
                timer.append(threading.Timer(timeout, flush))
                timer[0].daemon = True
                timer[0].start()
            held.append(group)
            full = len(held) >= n
        if full:
            flush()

    engine.submit = hold
    try:
        yield
    finally:
        del engine.submit
        flush()
