"""Phi-4-multimodal's log-mel audio features, equal to transformers' ``Phi4MultimodalFeatureExtractor``.

One clip at a time (the pipeline prepares each ``audio_url`` part alone; the encoder batches
them): the waveform is cut into 25 ms frames every 10 ms with no centring or padding (samples
after the last whole frame are dropped), each frame gets its own first-order pre-emphasis
(its first sample uses its second as the previous one) and is scaled to the 16-bit range,
a symmetric Hamming window, a 512-point real FFT computed in float64 then rounded to complex64,
the power spectrum through a Kaldi-scale mel bank triangularized in mel space, clamped at 1
and logged. The dtype sequence matches transformers' so values agree to float32 rounding.

Sample rates: transformers' extractor accepts only its configured rate (16 kHz) and refuses
others; here any other rate is resampled to it first (``mistralrs_arch_vision.audio.resample``,
soxr), so an 8 kHz or 44.1 kHz clip gives the features transformers gives for that clip
resampled to 16 kHz. (Microsoft's original processor instead fed 8 kHz audio through a
256-point FFT with the upper half of the spectrum zeroed; transformers 5 dropped that path and
is the reference here.)

Token count: ``num_tokens(n_frames)`` is transformers' ``audio_embed_sizes``: the frame count
(times ``audio_feat_stride``) divided by ``audio_compression_rate`` rounding up, then by
``audio_downsample_rate`` rounding up. It equals the encoder's output length (the conv
subsampling halves the length, rounding up, log2(time_reduction) times).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mistralrs_arch_vision.audio import resample


@dataclass(frozen=True)
class Phi4MMAudioFeatureConfig:
    """The fields of the feature extractor's config; defaults equal transformers'."""
    feature_size: int = 80
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 512
    win_length: int = 400
    preemphasis: float = 0.97
    audio_compression_rate: int = 8
    audio_downsample_rate: int = 1
    audio_feat_stride: int = 1
    mel_min_frequency: float = 0.0
    mel_max_frequency: float = 7690.0

    @classmethod
    def from_hf(cls, config: dict | None) -> "Phi4MMAudioFeatureConfig":
        """From ``preprocessor_config.json`` (Microsoft's flat one) or a transformers 5
        ``processor_config.json`` that nests the extractor under ``feature_extractor`` /
        ``audio_processor``."""
        d = dict(config or {})
        for key in ("feature_extractor", "audio_processor"):
            if isinstance(d.get(key), dict):
                d = dict(d[key])
                break
        kwargs = {name: d[name] for name in cls.__dataclass_fields__ if d.get(name) is not None}
        cfg = cls(**kwargs)
        for name in ("feature_size", "sampling_rate", "hop_length", "n_fft", "win_length",
                     "audio_compression_rate", "audio_downsample_rate", "audio_feat_stride"):
            if int(getattr(cfg, name)) <= 0:
                raise ValueError(f"audio feature config: {name} must be positive, got {getattr(cfg, name)}")
        if cfg.win_length > cfg.n_fft:
            raise ValueError(f"audio feature config: win_length {cfg.win_length} exceeds n_fft {cfg.n_fft}")
        return cfg


def _kaldi_mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def kaldi_mel_filters(n_freqs: int, n_mels: int, f_min: float, f_max: float, sampling_rate: int) -> np.ndarray:
    """[n_freqs, n_mels] triangular filters evenly spaced on the Kaldi mel scale, with the
    triangles drawn in mel space (each FFT bin's frequency is mapped to mel first), no area
    normalization; float64 like transformers' ``mel_filter_bank(..., mel_scale="kaldi",
    triangularize_in_mel_space=True)``."""
    if f_min > f_max:
        raise ValueError(f"mel_min_frequency {f_min} exceeds mel_max_frequency {f_max}")
    edges = np.linspace(_kaldi_mel(f_min), _kaldi_mel(f_max), n_mels + 2)
    bin_hz = sampling_rate / ((n_freqs - 1) * 2) * np.arange(n_freqs)
    bins = _kaldi_mel(bin_hz)[:, None]
    lower, centre, upper = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


@dataclass
class Phi4MMAudioClip:
    """One prepared clip: its log-mel ``features`` [n_frames, n_mels] float32 (CPU), how many
    audio placeholder tokens it expands to, and the projection its prompt calls for:
    ``"speech"``, or ``"vision"`` when the same prompt has images (transformers picks the
    vision-speech projection then; the family processor, which sees both, sets it)."""
    features: torch.Tensor
    num_tokens: int
    mode: str = "speech"

    @property
    def num_frames(self) -> int:
        return int(self.features.shape[0])


class Phi4MMAudioFeatureExtractor:
    """Waveform -> log-mel frames, as transformers' ``Phi4MultimodalFeatureExtractor``."""

    def __init__(self, cfg: Phi4MMAudioFeatureConfig | None = None):
        self.cfg = cfg or Phi4MMAudioFeatureConfig()
        c = self.cfg
        self.mel_filters = torch.from_numpy(kaldi_mel_filters(
            c.n_fft // 2 + 1, c.feature_size, c.mel_min_frequency, c.mel_max_frequency,
            c.sampling_rate)).to(torch.float32)
        self.window = torch.hamming_window(c.win_length, periodic=False, dtype=torch.float64)

    @classmethod
    def from_hf(cls, config: dict | None) -> "Phi4MMAudioFeatureExtractor":
        return cls(Phi4MMAudioFeatureConfig.from_hf(config))

    # --- counts -----------------------------------------------------------
    def num_frames(self, num_samples: int) -> int:
        """Frames of a clip of ``num_samples`` samples at the extractor's rate (0 if shorter
        than one window)."""
        c = self.cfg
        if num_samples < c.win_length:
            return 0
        return (num_samples - c.win_length) // c.hop_length + 1

    def num_tokens(self, num_frames: int) -> int:
        """Placeholder tokens of a clip with ``num_frames`` feature frames."""
        c = self.cfg
        n = math.ceil(num_frames * c.audio_feat_stride / c.audio_compression_rate)
        return math.ceil(n / c.audio_downsample_rate)

    # --- features ---------------------------------------------------------
    def _checked(self, samples, rate, where: str) -> np.ndarray:
        if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool) or rate <= 0:
            raise ValueError(f"{where}: sample rate must be a positive integer, got {rate!r}")
        wav = np.asarray(samples.detach().cpu().numpy() if torch.is_tensor(samples) else samples)
        if wav.ndim != 1:
            raise ValueError(f"{where}: expected mono samples [n], got shape {tuple(wav.shape)}")
        if wav.dtype.kind not in "fiu":
            raise ValueError(f"{where}: samples must be numbers, got dtype {wav.dtype}")
        wav = wav.astype(np.float32, copy=False)
        if not np.isfinite(wav).all():
            raise ValueError(f"{where}: samples contain NaN or infinity")
        if int(rate) != self.cfg.sampling_rate and wav.size:
            wav = resample(wav, int(rate), self.cfg.sampling_rate)
        if self.num_frames(wav.size) == 0:
            raise ValueError(
                f"{where}: audio clip is too short ({wav.size} samples at {self.cfg.sampling_rate} Hz); "
                f"at least {self.cfg.win_length} samples ({1000 * self.cfg.win_length / self.cfg.sampling_rate:g} ms) "
                "are needed for one feature frame")
        return wav

    def features(self, samples, rate: int, *, where: str = "audio") -> torch.Tensor:
        """Log-mel features [n_frames, n_mels] float32 of one mono clip (``samples`` [n],
        float, at ``rate`` Hz). Raises ValueError (naming ``where``) for a clip with no whole
        frame, non-finite samples or a bad rate."""
        c = self.cfg
        wav = torch.from_numpy(self._checked(samples, rate, where))
        frames = wav.unfold(0, c.win_length, c.hop_length)                  # [F, win] float32
        previous = torch.roll(frames, 1, dims=-1)
        previous[:, 0] = previous[:, 1]
        frames = (frames - c.preemphasis * previous) * 32768
        spectrum = torch.fft.rfft(self.window * frames, n=c.n_fft, dim=1).to(torch.complex64)
        power = spectrum.abs() ** 2
        return torch.log(torch.clamp(power @ self.mel_filters, min=1.0))

    def prepare(self, samples, rate: int, *, where: str = "audio") -> Phi4MMAudioClip:
        feats = self.features(samples, rate, where=where)
        return Phi4MMAudioClip(feats, self.num_tokens(feats.shape[0]))

    def prepare_audio(self, audio, *, where: str = "audio"):
        """The pipeline's audio hook: ``LoadedAudio`` -> ``ImagePrompt(num_tokens, data=
        Phi4MMAudioClip)``; a family processor can delegate its ``prepare_audio`` here."""
        from mistralrs_arch_vision.pipeline import ImagePrompt
        clip = self.prepare(audio.samples, audio.rate, where=where)
        return ImagePrompt(clip.num_tokens, clip)


def pad_clips(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack clips' features [n_i, n_mels] into ([B, max n, n_mels] zero-padded,
    mask [B, max n] True on real frames): the encoder's batched input."""
    if not features:
        raise ValueError("no audio clips to batch")
    longest = max(int(f.shape[0]) for f in features)
    out = features[0].new_zeros(len(features), longest, features[0].shape[-1])
    mask = torch.zeros(len(features), longest, dtype=torch.bool, device=features[0].device)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return out, mask
