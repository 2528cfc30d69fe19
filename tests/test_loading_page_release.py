"""Memory-mapped checkpoint pages leave the resident set and come back intact
(``mistralrs_core.loading.page_release``)."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from mistralrs_core.layers.linear import Linear
from mistralrs_core.loading.page_release import (copy_out_of_files, file_backed_ranges, release_pages,
                                                 release_tensor_pages)
from mistralrs_core.loading.safetensors_io import SafetensorsWeights
from mistralrs_core.loading.weights import load_module


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


def test_tensor_pages_released_one_tensor_at_a_time(tmp_path):
    """What ISQ does with each checkpoint tensor once quantized: only that tensor's pages
    go, the neighbours' stay, strided views and copies are handled, values are intact."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)   # 4 MiB each
    save_file({"a": a, "b": b}, tmp_path / "m.safetensors")
    sw = SafetensorsWeights(tmp_path / "m.safetensors")
    ta, tb = sw.get("a"), sw.get("b")
    assert float(ta.sum() + tb.sum()) == float(a.sum() + b.sum())    # both paged in
    before = _rss_file()
    released = release_tensor_pages(ta)
    assert 4 * 2**20 - 2 * 4096 <= released <= 4 * 2**20
    assert before - _rss_file() >= 3 * 2**20
    assert release_tensor_pages(ta) == 0          # nothing left to drop
    assert torch.equal(ta, a) and torch.equal(tb, b)
    # A column slice spans its rows' pages; a copy is anonymous and skipped.
    assert release_tensor_pages(tb[:, :8]) >= 4 * 2**20 - 2 * 4096
    assert release_tensor_pages(tb.clone(), torch.empty(0)) == 0
    assert torch.equal(tb, b)


def test_copy_out_of_files_leaves_nothing_mapped(tmp_path):
    """In-situ quantization's last step: the small tensors that stayed dense get their own
    memory (ties kept), so the checkpoint's mapping can close."""
    w, b, n = torch.randn(512, 512), torch.randn(512), torch.randn(512)
    save_file({"weight": w, "bias": b, "norm": n}, tmp_path / "m.safetensors")
    layer = Linear(512, 512, bias=True)
    with SafetensorsWeights(tmp_path / "m.safetensors") as sw:
        load_module(layer, [(k, v) for k, v in sw.items() if k != "norm"])
        layer.register_buffer("norm", sw.get("norm"))
        layer.tied = layer.weight
        views = {t.data_ptr() for t in (layer.weight, layer.bias, layer.norm)}
        # Only tensors below the size limit: the 1 MiB weight stays mapped at first.
        assert copy_out_of_files(layer, max_bytes=4096) == 2 * 512 * 4
        assert layer.weight.data_ptr() in views and file_backed_ranges(layer)
        assert copy_out_of_files(layer) == 512 * 512 * 4
    assert file_backed_ranges(layer) == []
    assert not views & {t.data_ptr() for t in (layer.weight, layer.bias, layer.norm)}
    assert torch.equal(layer.weight, w) and torch.equal(layer.bias, b) and torch.equal(layer.norm, n)
    assert layer.tied is layer.weight
    assert copy_out_of_files(layer) == 0
