"""Idle components' memory-mapped weight pages leave the resident set and come back intact."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from mistralrs_core.layers.linear import Linear
from mistralrs_core.loading.safetensors_io import SafetensorsWeights
from mistralrs_core.loading.weights import load_module

from mistralrs_arch_diffusion.page_release import file_backed_ranges, release_pages
from mistralrs_arch_diffusion.placement import Placement


def _rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


def test_released_pages_leave_rss_and_fault_back_unchanged(tmp_path):
    w = torch.randn(2048, 2048)  # 16 MiB
    save_file({"weight": w}, tmp_path / "m.safetensors")
    layer = Linear(2048, 2048)
    with SafetensorsWeights(tmp_path / "m.safetensors") as sw:
        load_module(layer, sw.items())
    assert file_backed_ranges(layer), "a same-dtype load should stay memory-mapped"
    x = torch.randn(3, 2048)
    want = layer(x)
    before = _rss_file()
    released = release_pages(layer)
    assert released >= 15 * 2**20
    assert before - _rss_file() >= 12 * 2**20
    assert torch.equal(layer(x), want)
    assert torch.equal(layer.weight, w)


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


def test_written_pages_are_kept(tmp_path):
    """A weight changed in place after loading (copy-on-write) keeps its new values."""
    w = torch.randn(1024, 1024)
    save_file({"weight": w}, tmp_path / "m.safetensors")
    layer = Linear(1024, 1024)
    with SafetensorsWeights(tmp_path / "m.safetensors") as sw:
        load_module(layer, sw.items())
    x = torch.randn(2, 1024)
    layer(x)
    with torch.no_grad():
        layer.weight[:8].mul_(2.0)
    want = w.clone()
    want[:8] *= 2.0
    released = release_pages(layer)
    assert torch.equal(layer.weight, want)
    # The untouched pages were still released.
    assert released >= 3 * 2**20
