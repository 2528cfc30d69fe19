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
from mistralrs_core.loading.quant_config import QuantConfig
from mistralrs_core.loading.weights import WeightLoader, finish_loading, resolve_weight
from mistralrs_core.models.positions import PromptPositions  # noqa: F401


class CausalLM(nn.Module):
    """Base of every generative text model.

    Subclasses build their modules with Hugging Face names, on the meta device; weights
    arrive through ``load_weights``. ``forward`` returns hidden states for the flat token
    batch, ``compute_logits`` turns selected rows into float32 logits.
    """

    #: True for models that keep per-sequence state outside the paged KV cache (Mllama's
    #: cross-attention K/V): the engine then gives each admitted sequence a state slot
    #: (``meta.state_slots``) and says when a slot changed hands (``meta.fresh_slots``).
    #: Recurrent layers get slots without asking (their ``kv_cache_specs``).
    uses_state_slots: bool = False

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
    # Thin delegates to ``loading.weights``, the one loading path every module shares;
    # families override ``map_weight_name`` / ``tie_weights`` or wrap ``load_weights``.
    def map_weight_name(self, name: str) -> str | None:
        """Hook for checkpoints whose names differ from the module tree; None drops it."""
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
                     device: torch.device | str = "cpu", quant_config: QuantConfig | None = None) -> None:
        """Stream ``(hf_name, tensor | QuantizedWeight)`` into the model. ``quant_config``
        (else ``self.quant_config`` if a loader set one; families that wrap this method do
        not forward extra arguments) decides what the quantization hook does."""
        from mistralrs_core.distributed.placement import prepare_for_load
        # Tensor-parallel sharding and device mapping change the modules while they are
        # still on the meta device, before the first weight arrives.
        prepare_for_load(self, device)
        loader = WeightLoader(self, device, self.dtype, quant_config or getattr(self, "quant_config", None))
        loader.load(self.route_weights(loader.packed_stream(weights), loader))
        self.quant_config = loader.quant_config
        self.finish_loading(device)

    def route_weights(self, weights, loader: WeightLoader):
        """The stream the loader places by name; a model whose modules store some weights
        their own way (stacked MoE experts) takes those here, asking ``loader.quant_method``."""
        return weights

    def _assign(self, module: nn.Module, attr: str, value, name: str, device) -> None:
        WeightLoader(self, device, self.dtype, getattr(self, "quant_config", None)).assign(module, attr, value, name)

    def finish_loading(self, device) -> None:
        """Tie weights, fail loudly on anything the checkpoint did not provide, then let
        modules change layout (``post_load``: fusing projections)."""
        finish_loading(self)

    def tie_weights(self) -> None:
        pass

    def resolve_weight(self, hf_name: str) -> tuple[nn.Module, slice | None]:
        """Where checkpoint tensor ``hf_name`` lives after loading and fusion."""
        return resolve_weight(self, hf_name)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
