"""Where each pipeline component lives, and where it runs.

``Flux``: every component is loaded onto the compute device and stays there.
``FluxOffloaded``: components are loaded into host memory and each is moved onto the
compute device only while it runs (CLIP, then T5, then the transformer for all steps, then
the VAE), so the accelerator holds one component at a time. When the compute device is the
host itself the moves are no-ops and the two behave alike: there, each component's
memory-mapped weight pages are handed back to the page cache once it has run (the core's
``loading/page_release.py``), so neither keeps every component resident at once.

The move itself is a parameter (``move(module, device)``) so the order can be checked
without an accelerator.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from mistralrs_core.loading.page_release import release_pages


def _move(module: nn.Module, device: torch.device) -> None:
    module.to(device)


class Placement:
    def __init__(self, compute: torch.device, offload: bool,
                 move: Callable[[nn.Module, torch.device], None] = _move, release_idle: bool | None = None):
        self.compute = torch.device(compute)
        self.offload = offload
        self.storage = torch.device("cpu") if offload else self.compute
        self._move = move
        # On the host, a component's memory-mapped weight pages go back to the page cache
        # when it finishes (the core's loading/page_release.py), so peak RSS is the largest
        # component.
        self.release_idle = self.compute.type == "cpu" if release_idle is None else release_idle

    @property
    def moves(self) -> bool:
        # A caller-supplied mover always runs, even host to host: that is how its order is observed.
        return self.offload and (self.storage != self.compute or self._move is not _move)

    @contextlib.contextmanager
    def running(self, module: nn.Module):
        """Run ``module`` on the compute device for the duration of the block."""
        if not self.moves:
            try:
                yield module
            finally:
                if self.release_idle and self.compute.type == "cpu":
                    release_pages(module)
            return
        self._move(module, self.compute)
        try:
            yield module
        finally:
            self._move(module, self.storage)
            if self.compute.type == "cuda":
                # Give the freed blocks back so the next component (and other processes) can use them.
                torch.cuda.empty_cache()
