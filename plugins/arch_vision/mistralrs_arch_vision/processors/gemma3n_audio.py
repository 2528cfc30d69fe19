"""Gemma 3n's audio features: log-mel frames of a 16 kHz clip, as the model was trained on.

Frames are 32 ms (512 samples + one look-back sample for the HTK-style pre-emphasis) every
10 ms, Hann-windowed, zero-padded to a 1024-point FFT ("overdrive"), magnitude (not power)
spectrum, 128 triangular mel bands from 125 to 7600 Hz without area normalisation, natural
log above a floor, then optional per-bin standardisation from the hub config. The clip is first
padded with zeros to a multiple of 128 samples and cut at 30 s, as the reference extractor does
(the model's prompt has room for 188 audio tokens, which 30 s fills).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mistralrs_arch_vision.audio import resample


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, rate: int, fft_length: int) -> np.ndarray:
    """[n_freqs, n_mels] triangles on the HTK mel scale (2595 log10(1 + f / 700))."""
    bins = np.arange(n_freqs, dtype=np.float32) * (rate / fft_length)
    lo, hi = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    edges = 700.0 * (10 ** (np.linspace(lo, hi, n_mels + 2) / 2595.0) - 1.0)
    width = np.diff(edges)
    dist = edges[None, :] - bins[:, None]                        # [n_freqs, n_mels + 2]
    rising = -dist[:, :-2] / width[:-1]
    falling = dist[:, 2:] / width[1:]
    return np.maximum(np.zeros(1, dtype=np.float32), np.minimum(rising, falling))


@dataclass
class Gemma3nAudioFeatures:
    """One clip's encoder input: mel frames [T, n_mels] float32 and their validity [T]."""
    mel: np.ndarray
    valid: np.ndarray


@dataclass
class Gemma3nAudioFeatureExtractor:
    feature_size: int = 128
    sampling_rate: int = 16_000
    padding_value: float = 0.0
    frame_length_ms: float = 32.0
    hop_length_ms: float = 10.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = True
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-5
    per_bin_mean: list[float] | None = None
    per_bin_stddev: list[float] | None = None
    max_samples: int = 480_000
    pad_to_multiple_of: int = 128
    filters: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.frame_length = int(round(self.sampling_rate * self.frame_length_ms / 1000.0))
        self.hop_length = int(round(self.sampling_rate * self.hop_length_ms / 1000.0))
        fft = 2 ** math.ceil(math.log2(self.frame_length))
        self.fft_length = fft * 2 if self.fft_overdrive else fft
        n = np.arange(self.frame_length, dtype=np.float32)
        self.window = (0.5 * (1 - np.cos(2 * np.pi * n / self.frame_length))).astype(np.float32)
        self.filters = mel_filterbank(self.fft_length // 2 + 1, self.min_frequency, self.max_frequency,
                                      self.feature_size, self.sampling_rate, self.fft_length)
        for name in ("per_bin_mean", "per_bin_stddev"):
            value = getattr(self, name)
            if value is not None and len(value) != self.feature_size:
                raise ValueError(f"preprocessor_config.json: {name} has {len(value)} values for "
                                 f"feature_size {self.feature_size}")

    @classmethod
    def from_config(cls, cfg: dict) -> "Gemma3nAudioFeatureExtractor":
        if float(cfg.get("dither", 0.0) or 0.0) != 0.0:
            # Dithering adds random noise per call: answers would not be reproducible.
            raise ValueError("preprocessor_config.json: dither > 0 is not supported (set it to 0.0)")
        names = set(cls.__dataclass_fields__) - {"filters", "max_samples", "pad_to_multiple_of"}
        return cls(**{k: cfg[k] for k in names if cfg.get(k) is not None})

    def __call__(self, samples: np.ndarray, rate: int) -> Gemma3nAudioFeatures:
        wave = resample(np.asarray(samples, dtype=np.float32), rate, self.sampling_rate)[: self.max_samples]
        n = len(wave)
        padded = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        wave = np.concatenate([wave, np.full(padded - n, self.padding_value, dtype=np.float32)])
        size = self.frame_length + 1
        count = (padded - size) // self.hop_length + 1
        if count <= 0:
            raise ValueError(f"the audio clip is too short: {n} samples at {self.sampling_rate} Hz give no "
                             f"{self.frame_length_ms:g} ms frame")
        wave = wave[None] * self.input_scale_factor if self.input_scale_factor != 1.0 else wave[None]
        frames = np.lib.stride_tricks.sliding_window_view(wave, size, axis=-1)[:, :: self.hop_length][:, :count]
        if self.preemphasis > 0.0:
            if self.preemphasis_htk_flavor:
                frames = np.concatenate([frames[..., :1] * (1.0 - self.preemphasis),
                                         frames[..., 1:-1] - self.preemphasis * frames[..., :-2]], axis=-1)
            else:
                frames = frames[..., 1:] - self.preemphasis * frames[..., :-1]
        else:
            frames = frames[..., :-1]
        spectrum = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        mel = np.log(np.maximum(spectrum @ self.filters, np.array(self.mel_floor, dtype=np.float64)))
        if self.per_bin_mean is not None:
            mel = mel - np.asarray(self.per_bin_mean).reshape(1, 1, -1)
        if self.per_bin_stddev is not None:
            mel = mel / np.asarray(self.per_bin_stddev).reshape(1, 1, -1)
        mel = mel[0].astype(np.float32)
        # A frame is valid when its first sample is real audio (not the multiple-of-128 padding).
        valid = (np.arange(count) * self.hop_length) < n
        return Gemma3nAudioFeatures(mel, valid)
