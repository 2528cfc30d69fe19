"""The CLIP text transformer (Flux's ``text_encoder``), for its pooled output: causal
pre-LN layers over token + learned position embeddings, a final LayerNorm, and the hidden
state at the end-of-text token. HF module names (``text_model.embeddings``,
``text_model.encoder.layers.N``, ``text_model.final_layer_norm``). Built from core layers
only (the vision plugin's CLIP tower is a separate distribution)."""
from __future__ import annotations

import attrs
import torch
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention_backends import EncoderAttention, EncoderBatch
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.norms import LayerNorm


@attrs.frozen
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407

    @classmethod
    def from_hf(cls, hf: dict) -> "CLIPTextConfig":
        hf = hf.get("text_config", hf)
        d = cls()
        return cls(**{f.name: hf.get(f.name, getattr(d, f.name)) for f in attrs.fields(cls)})


class _Attention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.head_dim = h // self.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(h, h, bias=True) for _ in range(4))
        self.attn = EncoderAttention()

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = (p(x).view(b, s, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = self.attn(q, k, v, EncoderBatch.padded(causal=True), scale=self.head_dim ** -0.5)
        return self.out_proj(out.reshape(b, s, h))


class _MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_hidden_layers)])


class _TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    # Checkpoints saved by newer transformers keep the position ids as a buffer.
    ignored_weight_suffixes = ("position_ids",)

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = _TextTransformer(cfg)

    @staticmethod
    def map_weight_name(name: str) -> str | None:
        # Hub checkpoints keep the ``text_model.`` prefix; transformers 5 saves without it.
        if name.startswith("text_projection."):
            return None
        return name if name.startswith("text_model.") else "text_model." + name

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S] ids -> (last hidden state [B, S, H], pooled [B, H])."""
        tm = self.text_model
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device)
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(pos)[None]
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        if self.cfg.eos_token_id == 2:
            # Original CLIP configs carry a placeholder eos id of 2; their end-of-text token is the
            # largest id in the vocabulary, so its first occurrence is the arg-max.
            eos_at = input_ids.to(torch.int).argmax(-1)
        else:
            eos_at = (input_ids == self.cfg.eos_token_id).int().argmax(-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos_at]
        return x, pooled
