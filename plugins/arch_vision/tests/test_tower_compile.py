"""The compiled CPU tower (towers/compiled.py): same features as transformers within the
float32 parity tolerance, used only for the shape it was compiled for, and never a hard
dependency (off, too small, or a failed compile: the eager tower)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mistralrs_core.loading.model_loader import build_text_model
from mistralrs_core.testing.parity import max_rel_err

import sys
sys.path.insert(0, str(Path(__file__).parent))
from tiny_llava import IMAGE, write_tiny_llava  # noqa: E402

from mistralrs_arch_vision.towers import compiled  # noqa: E402

TOL = 1e-4


def llava_features(ref, px, layer=-2):
    with torch.inference_mode():
        return torch.stack(list(ref.model.get_image_features(
            pixel_values=px, vision_feature_layer=layer, vision_feature_select_strategy="default").pooler_output))


@pytest.fixture(scope="module")
def two_layer_features(tmp_path_factory):
    """A LLaVa whose projector reads two tower layers (0 and 2), so the compiled graph
    returns more than one state."""
    return write_tiny_llava(tmp_path_factory.mktemp("llava_layers"), feature_layer=[0, -2])


def test_compiled_clip_tower_matches_reference_and_eager(two_layer_features, monkeypatch):
    out, ref, _ = two_layer_features
    model, _ = build_text_model(out, kind="vision")
    px = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = model.image_features(px)
    monkeypatch.setenv(compiled.ENV, "1")
    model.compile_for_inference()
    frozen = model.vision_tower.frozen
    assert frozen is not None and frozen.keep == (0, 2) and frozen.compile_s > 0
    calls = []
    monkeypatch.setattr(frozen, "_fn", lambda x, f=frozen._fn: calls.append(x.shape) or f(x))
    # The warm-up at load compiled the graph requests use: no second compile on the first one.
    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        ours = model.image_features(px)
    assert calls == [(1, 17, 32)] * 3            # one image at a time, the compiled shape
    assert max_rel_err(ours, llava_features(ref, px, [0, -2])) <= TOL
    assert max_rel_err(ours, eager) <= TOL


def test_compiled_siglip_tower_matches_reference(tmp_path, monkeypatch):
    from tiny_gemma3 import IMAGE as G_IMAGE, write_tiny_gemma3
    out, ref, _ = write_tiny_gemma3(tmp_path)
    model, _ = build_text_model(out, kind="vision")
    monkeypatch.setenv(compiled.ENV, "on")
    model.compile_for_inference()
    assert model.vision_tower.frozen is not None
    px = torch.randn(2, 3, G_IMAGE, G_IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        theirs = ref.model.get_image_features(pixel_values=px).pooler_output
        ours = model.image_features(px)
        # An intermediate layer is not what was compiled: the eager layers run it.
        assert model.vision_tower(px, feature_layer=1).shape == (2, (G_IMAGE // 7) ** 2, 32)
    assert max_rel_err(ours, theirs) <= TOL


def test_auto_leaves_small_towers_eager_and_off_means_off(tiny_llava, monkeypatch):
    out, _, _ = tiny_llava
    model, _ = build_text_model(out, kind="vision")
    for setting in ("auto", "0", "off"):
        monkeypatch.setenv(compiled.ENV, setting)
        model.compile_for_inference()
        assert model.vision_tower.frozen is None, setting
    monkeypatch.setattr(compiled, "AUTO_MIN_PARAMS", 0)
    monkeypatch.setattr(compiled, "have_cxx", lambda: False)     # no compiler: eager, no error
    monkeypatch.setenv(compiled.ENV, "auto")
    model.compile_for_inference()
    assert model.vision_tower.frozen is None


def test_a_failed_compile_leaves_the_tower_eager(tiny_llava, monkeypatch, caplog):
    out, ref, _ = tiny_llava
    model, _ = build_text_model(out, kind="vision")

    def broken(*a, **k):
        raise RuntimeError("no C++ toolchain")
    monkeypatch.setattr(compiled.torch, "compile", broken)
    monkeypatch.setenv(compiled.ENV, "1")
    with caplog.at_level(logging.WARNING):
        model.compile_for_inference()
    assert model.vision_tower.frozen is None
    assert "no C++ toolchain" in caplog.text
    px = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert max_rel_err(model.image_features(px), llava_features(ref, px)) <= TOL
