"""What every generative model gives the engine, and weight loading by Hugging Face names.

The contract: ``embed(ids)`` turns token ids into input embeddings; encoder features
(images, audio) replace the embeddings of their placeholder tokens (``encode_features`` +
``merge_features``); ``forward_embeds`` runs the layers from those embeddings at rope
positions the model may supply itself (``prompt_positions``: M-RoPE's 3 axes);
``compute_logits`` turns selected hidden rows into float32 logits.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mistralrs_core.layers.attention import AttentionMetadata, KVCacheSpec, LayerKVCache
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.quantized import QuantizedWeight
from mistralrs_core.models.positions import PromptPositions  # noqa: F401


class CausalLM(nn.Module):
    """Base of every generative text model.

    Subclasses build their modules with Hugging Face names, on the meta device; weights
    arrive through ``load_weights``. ``forward`` returns hidden states for the flat token
    batch, ``compute_logits`` turns selected rows into float32 logits.
    """

    #: names in checkpoints that carry no weights we need
    ignored_weight_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        # Quantized matmuls may run in a cheaper dtype than the residual stream (e.g. bf16
        # products on a float32 stream, as llama.cpp keeps activations in float32).
        self.quant_compute_dtype: torch.dtype | None = None
        self.max_context_len = 4096
        # A plugin may install a faster layer stack for the steps it covers (e.g. a compiled
        # decode step): called as fast_forward(embeds, positions, meta, caches), it returns
        # the hidden states, or None to leave the step to ``forward_embeds``.
        self.fast_forward = None

    # --- engine interface -------------------------------------------------
    def kv_cache_specs(self) -> list[KVCacheSpec | None]:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings [T, hidden] of a flat token batch."""
        raise NotImplementedError

    def forward_embeds(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       caches: list[LayerKVCache | None]) -> torch.Tensor:
        """Hidden states [T, hidden] from input embeddings; ``positions`` is [T] or [axes, T]."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                caches: list[LayerKVCache | None]) -> torch.Tensor:
        """Text-only convenience (tests, parity helpers): embed, then run the layers."""
        return self.forward_embeds(self.embed(input_ids), positions, meta, caches)

    # --- multimodal inputs (models with encoders override these) -----------
    def prompt_positions(self, prompt_ids: list[int], spans) -> "PromptPositions | None":
        """Rope positions of a prompt when they are not simply token indices (M-RoPE)."""
        return None

    def encode_features(self, spans) -> list[torch.Tensor]:
        """Encoder features [span.length, hidden] for each ``FeatureSpan`` (batched)."""
        raise ValueError(f"{type(self).__name__} takes no image or audio inputs")

    def merge_features(self, embeds: torch.Tensor, rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Put encoder features into the rows of their placeholder tokens."""
        return embeds.index_copy(0, rows, features.to(embeds.dtype))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- weights ----------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        """Hook for checkpoints whose names differ from the module tree; None drops it."""
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
                     device: torch.device | str = "cpu") -> None:
        modules = dict(self.named_modules())
        for raw_name, value in weights:
            if raw_name.endswith(self.ignored_weight_suffixes):
                continue
            name = self.map_weight_name(raw_name)
            if name is None:
                continue
            mod_name, _, attr = name.rpartition(".")
            module = modules.get(mod_name)
            if module is None or not hasattr(module, attr):
                raise ValueError(f"unexpected weight {raw_name!r} for {type(self).__name__}")
            self._assign(module, attr, value, name, device)
        self.finish_loading(device)

    def _assign(self, module: nn.Module, attr: str, value, name: str, device) -> None:
        if isinstance(value, QuantizedWeight) and not isinstance(value, torch.Tensor):
            if attr == "weight" and isinstance(module, (Linear, Embedding)):
                module.set_quant_method(value.quant_method(self.quant_compute_dtype or self.dtype))
                return
            value = value.dequantize()
        current = getattr(module, attr)
        if current is not None and tuple(current.shape) != tuple(value.shape):
            raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(current.shape)}")
        tensor = value.to(device=device, dtype=self.dtype)
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))

    def finish_loading(self, device) -> None:
        """Tie weights, then fail loudly on anything the checkpoint did not provide."""
        self.tie_weights()
        missing = [n for n, p in self.named_parameters() if p.device.type == "meta"]
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} weight(s) for "
                             f"{type(self).__name__}: {shown}")
        # Layout changes that need every weight in place (e.g. fusing projections).
        for module in list(self.modules()):
            hook = getattr(module, "post_load", None)
            if hook is not None:
                hook()

    def tie_weights(self) -> None:
        pass

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
