"""Idle components' memory-mapped weight pages leave the resident set after they run (the
release itself is tested in the core's tests/test_loading_page_release.py)."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from mistralrs_core.layers.linear import Linear
from mistralrs_core.loading.page_release import file_backed_ranges, release_pages
from mistralrs_core.loading.safetensors_io import SafetensorsWeights
from mistralrs_core.loading.weights import load_module

from mistralrs_arch_diffusion.placement import Placement


def _rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


def test_placement_releases_after_running_on_the_host(tmp_path):
    save_file({"weight": torch.randn(1024, 1024)}, tmp_path / "m.safetensors")
    layer = Linear(1024, 1024)
    with SafetensorsWeights(tmp_path / "m.safetensors") as sw:
        load_module(layer, sw.items())
    for release, expect_drop in ((False, False), (True, True)):
        place = Placement(torch.device("cpu"), offload=False, release_idle=release)
        with place.running(layer):
            layer(torch.randn(1, 1024))
            during = _rss_file()
        dropped = during - _rss_file() >= 3 * 2**20
        assert dropped == expect_drop
    # Anonymous (copied) weights are never touched.
    dense = Linear(8, 8)
    dense.weight = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    assert file_backed_ranges(dense) == [] and release_pages(dense) == 0
