"""Sample-rate conversion for audio encoders: every encoder has one rate its features
are defined at (16 kHz for Phi-4-multimodal and Gemma 3n), and clips come at any rate.

soxr's "HQ" resampler (the one librosa uses by default) keeps the passband flat to well
above any encoder's mel range, so a 44.1 kHz clip and its 16 kHz version give features
that differ only by the band the encoder never sees."""
from __future__ import annotations

import numpy as np


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """float32 mono ``samples`` at ``src_rate`` -> at ``dst_rate``; the same array when the
    rates are equal."""
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
    if src_rate == dst_rate:
        return samples
    import soxr
    out = soxr.resample(np.asarray(samples, dtype=np.float32), src_rate, dst_rate, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)
