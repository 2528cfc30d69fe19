"""Gemma 3n's multimodal embedder: tower features or multimodal token ids -> text embeddings.

One per modality (``embed_vision``, ``embed_audio``; same module names as transformers'
``Gemma3nMultimodalEmbedder``). Soft features (the tower's output) are RMS-normalised with
``soft_embedding_norm``; token ids in ``[vocab_offset, vocab_offset + vocab_size)`` (the
modality's own special tokens, e.g. end-of-image) look up ``embedding`` and are normalised
with ``hard_embedding_norm``. Both then go through ``embedding_projection`` (no bias) and a
weightless RMSNorm. Every norm computes in float32 (Gemma 3n's RMSNorm: x * (mean(x^2) +
eps)^-0.5 * w).
"""
from __future__ import annotations

import torch
from torch import nn

from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.norms import RMSNorm


class _UnscaledRMSNorm(nn.Module):
    """Gemma 3n's ``with_scale=False`` RMSNorm: no weight, nothing in the checkpoint."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)).to(x.dtype)


class Gemma3nMultimodalEmbedder(nn.Module):
    """Args: the modality's hidden size, the text model's hidden size, the modality's
    ``vocab_size`` / ``vocab_offset`` (its token ids' range) and ``rms_norm_eps``."""

    def __init__(self, multimodal_hidden: int, text_hidden: int, vocab_size: int, vocab_offset: int,
                 eps: float = 1e-6):
        super().__init__()
        self.multimodal_hidden = multimodal_hidden
        self.vocab_size, self.vocab_offset = vocab_size, vocab_offset
        self.embedding = Embedding(vocab_size, multimodal_hidden)
        self.hard_embedding_norm = RMSNorm(multimodal_hidden, eps=eps, cast_before_scale=False)
        self.soft_embedding_norm = RMSNorm(multimodal_hidden, eps=eps, cast_before_scale=False)
        self.embedding_projection = Linear(multimodal_hidden, text_hidden, bias=False)
        self.embedding_post_projection_norm = _UnscaledRMSNorm(eps)

    @classmethod
    def from_hf(cls, modality_config: dict, text_hidden: int) -> "Gemma3nMultimodalEmbedder":
        """From config.json's ``vision_config`` or ``audio_config`` (defaults: transformers'
        Gemma3nVisionConfig) and the text model's ``hidden_size``."""
        return cls(int(modality_config.get("hidden_size") or 2048), int(text_hidden),
                   int(modality_config.get("vocab_size") or 128), int(modality_config.get("vocab_offset") or 262_144),
                   float(modality_config.get("rms_norm_eps") or 1e-6))

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        """Which token ids this embedder embeds (a bool mask)."""
        return (ids >= self.vocab_offset) & (ids < self.vocab_offset + self.vocab_size)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids in this modality's range -> [..., text_hidden]."""
        if ids.numel() and not bool(self.owns(ids).all()):
            raise ValueError(f"token ids outside [{self.vocab_offset}, {self.vocab_offset + self.vocab_size})")
        hard = self.embedding(ids - self.vocab_offset)
        return self._project(self.hard_embedding_norm(hard))

    def embed_soft(self, features: torch.Tensor) -> torch.Tensor:
        """Tower features [..., multimodal_hidden] -> [..., text_hidden] (transformers'
        ``forward(inputs_embeds=...)``)."""
        return self._project(self.soft_embedding_norm(features))

    def embed_image_features(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        """MobileNetV5 soft tokens [B, 256, hidden] -> [B, 256, text_hidden], with the
        sqrt(hidden) scaling ``Gemma3nModel.get_image_features`` applies first (the norm that
        follows cancels it except through eps, so it is kept for exact parity)."""
        return self.embed_soft(soft_tokens * self.multimodal_hidden ** 0.5)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_post_projection_norm(self.embedding_projection(x))
