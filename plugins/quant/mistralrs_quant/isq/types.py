"""ISQ type names: parsing (as upstream's ``parse_isq_value``), promotion of sensitive
tensors, and the registry that maps each name to what quantizes it.

The GGML types are served here (``formats`` + the C++ quantizers). The other families
(HQQ, FP8, AFQ, F8Q8) are method classes in ``mistralrs_quant.formats.<family>`` with a
``from_float(weight, bits, group_size, device)`` classmethod; the registry names them as
``"module:Class"`` and imports them only when a layer is quantized, so a family whose
module is not installed yet fails with one clear error, at parse time.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from mistralrs_core.errors import NotAvailableYet

from ..formats import T


@dataclass(frozen=True)
class IsqType:
    name: str                          # canonical upstream spelling, e.g. "Q4K"
    ggml_type: int | None = None       # ggml block type for the GGML family
    target: str | None = None          # "module:Class" for the other families
    kwargs: dict = field(default_factory=dict, compare=False, hash=False)
    uqff_stem: str = ""                # upstream's lower-case label, shard names "<stem>-<N>.uqff"

    @property
    def is_ggml(self) -> bool:
        return self.ggml_type is not None

    def load_class(self):
        """The method class of a non-GGML family (imported now)."""
        module, _, cls = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            raise NotAvailableYet(f"in_situ_quant={self.name}",
                                  f"its quantizer {self.target} is not available ({exc})") from None


def _ggml(name: str, t: int) -> IsqType:
    return IsqType(name, ggml_type=t, uqff_stem=name.lower())


def _family(name: str, target: str, stem: str, **kw) -> IsqType:
    return IsqType(name, target=target, kwargs=kw, uqff_stem=stem)


_F = "mistralrs_quant.formats"
TYPES: dict[str, IsqType] = {t.name: t for t in (
    _ggml("Q4_0", T.Q4_0), _ggml("Q4_1", T.Q4_1), _ggml("Q5_0", T.Q5_0), _ggml("Q5_1", T.Q5_1),
    _ggml("Q8_0", T.Q8_0), _ggml("Q8_1", T.Q8_1), _ggml("Q2K", T.Q2_K), _ggml("Q3K", T.Q3_K),
    _ggml("Q4K", T.Q4_K), _ggml("Q5K", T.Q5_K), _ggml("Q6K", T.Q6_K), _ggml("Q8K", T.Q8_K),
    _ggml("MXFP4", T.MXFP4),
    _family("HQQ4", f"{_F}.hqq:HQQMethod", "hqq4", bits=4, group_size=64),
    _family("HQQ8", f"{_F}.hqq:HQQMethod", "hqq8", bits=8, group_size=64),
    _family("FP8", f"{_F}.fp8:FP8Method", "fp8", bits=None, group_size=None),
    _family("AFQ2", f"{_F}.afq:AFQMethod", "afq2", bits=2, group_size=64),
    _family("AFQ3", f"{_F}.afq:AFQMethod", "afq3", bits=3, group_size=64),
    _family("AFQ4", f"{_F}.afq:AFQMethod", "afq4", bits=4, group_size=64),
    _family("AFQ6", f"{_F}.afq:AFQMethod", "afq6", bits=6, group_size=64),
    _family("AFQ8", f"{_F}.afq:AFQMethod", "afq8", bits=8, group_size=64),
    _family("F8Q8", f"{_F}.f8q8:F8Q8Method", "f8q8", bits=None, group_size=None),
)}

# Spellings accepted besides the canonical names (upstream: "fp8" is F8E4M3).
_ALIASES = {"f8e4m3": "FP8"}

# The numeric shorthands off Metal (upstream's IsqBits::resolve on CPU/CUDA).
SHORTHANDS = {"2": "Q2K", "3": "Q3K", "4": "Q4K", "5": "Q5K", "6": "Q6K", "8": "Q8_0"}

# Embeddings and LM heads get a higher-precision type (upstream's promote_for_sensitive_tensor).
_PROMOTE = {**{n: "Q6K" for n in ("Q2K", "Q3K", "Q4K", "Q4_0", "Q4_1")},
            **{n: "Q8_0" for n in ("Q5K", "Q6K", "Q8K", "Q5_0", "Q5_1", "Q8_0", "Q8_1")},
            **{n: "AFQ6" for n in ("AFQ2", "AFQ3", "AFQ4")}, "AFQ6": "AFQ8", "AFQ8": "AFQ8"}

VALID = ", ".join(["2", "3", "4", "5", "6", "8"] + list(TYPES))


def parse_isq_type(value, field_name: str = "in_situ_quant") -> IsqType:
    """The ISQ type a user string names (case-insensitive; numeric shorthands as upstream
    resolves them off Metal). Unknown names are a ValueError listing the valid ones."""
    if isinstance(value, IsqType):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field_name}: expected an ISQ type name, got {value!r}; valid: {VALID}")
    key = value.strip()
    name = SHORTHANDS.get(key) or _ALIASES.get(key.lower()) or key.upper()
    isq = TYPES.get(name)
    if isq is None:
        raise ValueError(f"{field_name}: unknown ISQ type {value!r}; valid: {VALID}")
    return isq


def promoted(isq: IsqType) -> IsqType:
    """The type used for token embeddings and the LM head when ``isq`` is the default."""
    return TYPES[_PROMOTE.get(isq.name, isq.name)]


def check_available(isq: IsqType) -> None:
    """Fail now (not mid-load) when a non-GGML family's module is missing."""
    if not isq.is_ggml:
        isq.load_class()
