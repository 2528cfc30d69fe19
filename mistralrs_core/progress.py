"""Progress shown while a model loads: tqdm bars and one-line notices on stderr.

Shown when asked, else only when stderr is a terminal (logs and pipes stay clean):

1. ``Runner(..., progress=True/False)`` (the load option ``progress``), for that load;
2. else the environment, ``MISTRALRS_PROGRESS=1`` (show) or ``0`` (hide);
3. else whether stderr is a terminal.

A load runs inside ``scope(setting)``; the setting is a context variable, so it follows the
load's own thread and any thread started with ``in_context`` (the engine's), and two
Runners loading at once each keep their own.

For code that reports progress (the weight loader, ISQ, kernel builds)::

    from mistralrs_core import progress
    for layer in progress.bar(layers, desc="ISQ q4k", unit="layer"):
        ...
    with progress.bar(total=n, desc="ISQ q4k", unit="layer") as b:
        ...; b.update(1)
    progress.notice("compiling the C++ kernels (first use, about 30 s)")

``bar`` returns a real tqdm bar when progress is on and an inert stand-in with the same
``update``/``close``/iteration/context-manager surface when it is off, so callers never
branch on the setting.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

ENV = "MISTRALRS_PROGRESS"
_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"0", "false", "no", "off"})

_T = TypeVar("_T")
_setting: contextvars.ContextVar[bool | None] = contextvars.ContextVar("mistralrs_progress", default=None)
_hub_lock = threading.Lock()
_hub_quiet_depth = 0
_hub_restore = False   # whether the hub's bars were on before the first quiet load


def check_setting(value: object, name: str = "progress") -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name}: must be True, False or None, got {value!r}")
    return value


def env_setting() -> bool | None:
    """``MISTRALRS_PROGRESS`` as a bool; None when unset or empty. Anything else is an
    error naming the variable (a typo must not silently mean "off")."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw:
        return None
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    raise ValueError(f"{ENV}: must be 1 or 0 (or true/false, yes/no, on/off), got {raw!r}")


def enabled(setting: bool | None = None) -> bool:
    """Whether progress is shown here: ``setting``, else the current scope's, else the
    environment's, else whether stderr is a terminal."""
    for choice in (setting, _setting.get()):
        if choice is not None:
            return choice
    env = env_setting()
    if env is not None:
        return env
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


@contextlib.contextmanager
def scope(setting: bool | None) -> Iterator[bool]:
    """Progress for everything inside (one model load): ``setting`` (None: environment or
    terminal). Hides huggingface_hub's own download bars while progress is off."""
    check_setting(setting)
    token = _setting.set(setting)
    on = enabled()
    try:
        with contextlib.nullcontext() if on else _hub_bars_hidden():
            yield on
    finally:
        _setting.reset(token)


@contextlib.contextmanager
def _hub_bars_hidden() -> Iterator[None]:
    # huggingface_hub's switch is process-wide: count the loads that want it off so that
    # the last one to finish turns it back on (and only if it was on before the first).
    global _hub_quiet_depth, _hub_restore
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:
        yield
        return
    with _hub_lock:
        _hub_quiet_depth += 1
        if _hub_quiet_depth == 1:
            _hub_restore = not are_progress_bars_disabled()
            disable_progress_bars()
    try:
        yield
    finally:
        with _hub_lock:
            _hub_quiet_depth -= 1
            if _hub_quiet_depth == 0 and _hub_restore:
                enable_progress_bars()


def in_context(fn: Callable[..., _T]) -> Callable[..., _T]:
    """``fn`` bound to the caller's context: a thread started on it sees this load's
    progress setting (threads otherwise start with an empty context)."""
    ctx = contextvars.copy_context()
    return lambda *a, **k: ctx.run(fn, *a, **k)


class _Quiet(Generic[_T]):
    """What ``bar`` returns when progress is off: tqdm's surface, doing nothing."""

    def __init__(self, iterable: Iterable[_T] | None) -> None:
        self._iterable = iterable
        self.n = 0

    def __iter__(self) -> Iterator[_T]:
        if self._iterable is None:
            raise TypeError("progress.bar: nothing to iterate (created with total= only)")
        # The iterable's own iterator: a generator here would hold each item one step longer.
        return iter(self._iterable)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Quiet[_T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(iterable: Iterable[_T] | None = None, *, total: int | None = None, desc: str,
        unit: str = "it", setting: bool | None = None) -> Any:
    """A tqdm bar on stderr when progress is on (see the module doc), else an inert one.
    ``total`` defaults to ``len(iterable)`` where it has one; without it the bar counts."""
    if not enabled(setting):
        return _Quiet(iterable)
    from tqdm.auto import tqdm
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=True, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.2)


def notice(message: str, setting: bool | None = None) -> None:
    """One line on stderr when progress is on: for waits that have no steps to count
    (a compiler running for seconds)."""
    if enabled(setting):
        print(f"mistralrs: {message}", file=sys.stderr, flush=True)
