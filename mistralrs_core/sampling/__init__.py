"""Sampling: per-request parameters, the batched logits pipeline and the default sampler."""

from .params import DEFAULT_DRY_SEQUENCE_BREAKERS, SamplingParams, encode_sequence_breakers
from .pipeline import LogitsProcessor
from .sampler import Sampler
from .state import SampledToken, SamplingState

__all__ = [
    "DEFAULT_DRY_SEQUENCE_BREAKERS",
    "LogitsProcessor",
    "SampledToken",
    "Sampler",
    "SamplingParams",
    "SamplingState",
    "encode_sequence_breakers",
]
