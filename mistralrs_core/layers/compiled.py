"""Inductor-compiled element-wise regions for CPU inference, with an eager fallback.

Between the GEMMs of a transformer on CPU, short chains of element-wise ops (norms, rotary
embeddings, casts) each make a pass over the activations; inductor turns a chain into one
C++ loop. Families use it for hot chains whose shapes vary (``dynamic=True``: one compile
covers every sequence length) or for whole towers of fixed shape. A compile needs a C++
compiler at run time and takes seconds, so it is optional: the eager function gives the same
numbers, and any compile or run failure switches to it for good, with one warning.

Each feature reads its own environment variable (``auto``/``1``/``0``): see ``setting``.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Callable

import torch

log = logging.getLogger(__name__)


def setting(env: str) -> str:
    """``auto``, ``on`` or ``off`` from the environment variable ``env`` (unknown values
    read as ``auto``)."""
    raw = os.environ.get(env, "auto").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return "off"
    if raw in ("1", "true", "yes", "on"):
        return "on"
    return "auto"


def have_cxx() -> bool:
    """Whether inductor's C++ backend has a compiler to call."""
    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))


class CompiledOrEager:
    """``fn`` compiled by inductor (dynamic shapes, whole graph), falling back to ``fn``
    itself for good after the first failure. ``compiled``: whether calls still go through
    the compiled graph."""

    def __init__(self, fn: Callable, what: str):
        self.eager = fn
        self.what = what
        self.compiled = True
        self._fn = torch.compile(fn, dynamic=True, fullgraph=True)

    def __call__(self, *args, **kwargs):
        if self.compiled:
            try:
                return self._fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - inductor raises many kinds; eager always works
                self.compiled = False
                log.warning("%s: compile failed, running it eager: %s: %s", self.what, type(e).__name__, e)
        return self.eager(*args, **kwargs)


def maybe_compiled(fn: Callable, env: str, what: str) -> Callable:
    """``CompiledOrEager(fn)`` unless ``env`` says ``0`` or no C++ compiler is found
    (``auto``); else ``fn``."""
    mode = setting(env)
    if mode == "off" or (mode == "auto" and not have_cxx()):
        return fn
    return CompiledOrEager(fn, what)
