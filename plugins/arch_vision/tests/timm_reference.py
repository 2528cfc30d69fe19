"""timm (the reference for Gemma 3n's MobileNetV5 tower) imported without torchvision.

timm is a test-only dependency. ``import timm`` imports every model module, and a few of them
(and ``timm.data``) import torchvision at module level for things MobileNetV5 never runs:
``FrozenBatchNorm2d``, the data transforms and datasets. The torchvision wheel on this index
is a CUDA build that does not import here, so while timm is imported a stand-in package
answers those imports with inert placeholders; it is removed from ``sys.modules`` right after,
so nothing else (transformers' availability checks included) ever sees a torchvision.
"""
from __future__ import annotations

import sys
import types

_STUBBED = (
    "torchvision",
    "torchvision.ops",
    "torchvision.ops.misc",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.datasets",
    "torchvision.utils",
)


class _PlaceholderMeta(type):
    """Any attribute of a placeholder class is another placeholder (``InterpolationMode.BILINEAR``
    is used as a dict key at import time)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")


def _placeholder(name: str) -> type:
    def refuse(*_args, **_kwargs):
        raise RuntimeError(f"torchvision stand-in: {name} is not available in this test environment")
    return _PlaceholderMeta(name, (), {"__init__": refuse})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def _install_stand_in() -> list[str]:
    import importlib.machinery
    added = []
    for name in _STUBBED:
        module = _StubModule(name)
        module.__path__ = []  # a package, so its submodules resolve
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
        added.append(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    return added


def _remove(names: list[str]) -> None:
    for name in names:
        sys.modules.pop(name, None)


def import_timm():
    """Import timm (once per process), make transformers' ``TimmWrapperModel`` usable with
    it, and return the module.

    transformers counts timm as available only together with torchvision, and caches the
    answer; it is recomputed here once with the stand-in present (so ``TimmWrapperModel``
    and ``Gemma3nVisionConfig`` accept timm), and the torchvision answer is recomputed again
    after the stand-in is gone (so every other check still sees no torchvision)."""
    if "timm" in sys.modules and getattr(sys.modules["timm"], "_mistralrs_ready", False):
        return sys.modules["timm"]
    added = [] if _torchvision_imports() else _install_stand_in()
    import_utils = None
    try:
        import timm
        try:
            from transformers.utils import import_utils
        except ImportError:
            import_utils = None
        if import_utils is not None:
            import_utils.is_torchvision_available.cache_clear()
            import_utils.is_timm_available.cache_clear()
            import_utils.is_timm_available()
    finally:
        _remove(added)
        if added and import_utils is not None:
            import_utils.is_torchvision_available.cache_clear()
    if import_utils is not None:
        from transformers.models.timm_wrapper import modeling_timm_wrapper
        if not hasattr(modeling_timm_wrapper, "timm"):
            # imported earlier in this process, when timm did not count as available
            modeling_timm_wrapper.timm = timm
    timm._mistralrs_ready = True
    return timm


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:
        _remove(list(_STUBBED))
        return False
