"""Sentence-embedding models: a decoder body followed by the sentence-transformers modules
(pooling, dense projections, L2 normalisation) that the model folder's modules.json lists.

Family modules subclass ``SentenceEmbeddingModel``, name their decoder class and the
pooling to assume when a folder has no modules.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.models.decoder import DecoderLM

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations sentence-transformers stores as torch class paths; anything else
# would mean importing a name from a downloaded file, which we refuse.
_ACTIVATIONS = {
    "Identity": lambda x: x,
    "Tanh": torch.tanh,
    "ReLU": F.relu,
    "GELU": F.gelu,
    "Sigmoid": torch.sigmoid,
    "SiLU": F.silu,
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc}") from None


def pooling_modes(cfg: dict) -> tuple[str, ...]:
    """Modes of a Pooling config.json, in either the current or the legacy spelling."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if cfg.get(key))
        mode = modes or ("mean",)
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise ValueError(f"pooling mode(s) {bad} are not supported; known: {POOLING_MODES}")
    return modes


def pool(hidden: torch.Tensor, lengths: list[int], modes: tuple[str, ...]) -> torch.Tensor:
    """Pool the flat rows [T, H] of sequences of ``lengths`` into [B, H * len(modes)]."""
    out = []
    for seq in torch.split(hidden, lengths):
        parts = []
        for mode in modes:
            if mode == "cls":
                parts.append(seq[0])
            elif mode == "lasttoken":
                parts.append(seq[-1])
            elif mode == "max":
                parts.append(seq.max(dim=0).values)
            elif mode == "mean":
                parts.append(seq.mean(dim=0))
            elif mode == "mean_sqrt_len_tokens":
                parts.append(seq.sum(dim=0) / len(seq) ** 0.5)
            else:  # weightedmean: position weights 1..n
                w = torch.arange(1, len(seq) + 1, dtype=seq.dtype, device=seq.device)[:, None]
                parts.append((seq * w).sum(dim=0) / w.sum())
        out.append(torch.cat(parts))
    return torch.stack(out)


class DenseLayer(nn.Module):
    """A sentence-transformers Dense module: act(linear(x)) (+ an optional residual)."""

    def __init__(self, folder: Path, device):
        super().__init__()
        cfg = _read_json(folder / "config.json")
        self.in_features, self.out_features = int(cfg["in_features"]), int(cfg["out_features"])
        act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
        name = act.rsplit(".", 1)[-1]
        if not act.startswith("torch.") or name not in _ACTIVATIONS:
            raise ValueError(f"{str(folder)!r}: Dense activation {act!r} is not supported; "
                             f"known: {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[name]
        weights_file = folder / "model.safetensors"
        if not weights_file.is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no model.safetensors for its Dense layer "
                                    "(pickle weights are refused for safety)")
        from safetensors.torch import load_file
        w = load_file(str(weights_file), device=str(device))
        self.weight = w["linear.weight"].float()
        bias = w.get("linear.bias") if cfg.get("bias", True) else None
        self.bias = bias.float() if bias is not None else None
        if tuple(self.weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{str(folder)!r}: linear.weight has shape {tuple(self.weight.shape)}, "
                             f"expected {(self.out_features, self.in_features)}")
        self.use_residual = bool(cfg.get("use_residual", False))
        self.residual = w["residual.weight"].float() if "residual.weight" in w else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(F.linear(x, self.weight, self.bias))
        if self.use_residual:
            out = out + (x if self.residual is None else F.linear(x, self.residual))
        return out


@attrs.define(eq=False)
class SentenceHead:
    """Everything after the transformer: pooling, dense layers, normalisation."""
    pooling: tuple[str, ...]
    dense: list[DenseLayer] = attrs.field(factory=list)
    normalize: bool = True
    max_seq_length: int | None = None

    @classmethod
    def from_dir(cls, model_dir: Path, device, default_pooling: tuple[str, ...],
                 default_normalize: bool = True) -> "SentenceHead":
        """Read modules.json (absent: the family's defaults)."""
        model_dir = Path(model_dir)
        max_len = None
        st_cfg = model_dir / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_len = _read_json(st_cfg).get("max_seq_length")
        modules_file = model_dir / "modules.json"
        if not modules_file.is_file():
            return cls(pooling=default_pooling, normalize=default_normalize, max_seq_length=max_len)
        modules = _read_json(modules_file)
        pooling, dense, normalize = None, [], False
        for m in sorted(modules, key=lambda m: m.get("idx", 0)):
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            folder = model_dir / m.get("path", "")
            if kind == "Transformer":
                # Its own sentence_bert_config.json may sit in a subfolder.
                sub = folder / "sentence_bert_config.json"
                if max_len is None and sub.is_file():
                    max_len = _read_json(sub).get("max_seq_length")
            elif kind == "Pooling":
                pooling = pooling_modes(_read_json(folder / "config.json"))
            elif kind == "Dense":
                dense.append(DenseLayer(folder, device))
            elif kind == "Normalize":
                normalize = True
            else:
                raise ValueError(f"modules.json: sentence-transformers module {m.get('type')!r} "
                                 "is not supported")
        return cls(pooling=pooling or default_pooling, dense=dense, normalize=normalize,
                   max_seq_length=int(max_len) if max_len else None)

    def __call__(self, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = pool(hidden.float(), lengths, self.pooling)
        for layer in self.dense:
            x = layer(x)
        return F.normalize(x, p=2, dim=-1) if self.normalize else x


class SentenceEmbeddingModel(nn.Module):
    """A decoder body (no LM head) plus a ``SentenceHead``."""

    #: the text family whose body this model uses
    backbone_cls: type[DecoderLM] = DecoderLM
    #: pooling when the folder has no modules.json
    default_pooling: tuple[str, ...] = ("mean",)

    def __init__(self, backbone: DecoderLM, head: SentenceHead):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.dtype = backbone.dtype

    @classmethod
    def adjust_hf_config(cls, hf: dict) -> dict:
        return hf

    @classmethod
    def load(cls, model_dir: Path, hf: dict, dtype=torch.float32, device="cpu") -> "SentenceEmbeddingModel":
        from mistralrs_core.loading.safetensors_io import SafetensorsWeights
        cfg = cls.backbone_cls.config_from_hf(cls.adjust_hf_config(dict(hf)))
        # Tying drops the LM head: embedding checkpoints do not ship one.
        backbone = cls.backbone_cls(attrs.evolve(cfg, tie_word_embeddings=True), dtype)

        def body_weights():
            # Saved from the bare model (``Gemma3TextModel``), names lack the ``model.`` prefix.
            for name, tensor in SafetensorsWeights(model_dir).items():
                if name.startswith("lm_head."):
                    continue
                yield (name if name.startswith("model.") else "model." + name), tensor

        backbone.load_weights(body_weights(), device=device)
        backbone.eval()
        return cls(backbone, SentenceHead.from_dir(model_dir, device, cls.default_pooling))

    @property
    def vocab_size(self) -> int:
        return self.backbone.cfg.vocab_size

    @property
    def max_context(self) -> int:
        limit = self.backbone.max_context_len
        return min(limit, self.head.max_seq_length) if self.head.max_seq_length else limit

    @property
    def causal(self) -> bool:
        return self.backbone.cfg.causal

    @property
    def device(self) -> torch.device:
        return self.backbone.model.embed_tokens.weight.device

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        """One forward over every sequence of ``batch`` (no KV cache) -> [B, D] float32."""
        lengths = [len(s) for s in batch]
        # One block per sequence, as long as the longest, so every slot index stays in range.
        ids, pos, meta = build_metadata([(s, 0, []) for s in batch], max(lengths), self.device,
                                        causal=self.causal)
        hidden = self.backbone(ids, pos, meta, None)
        return self.head(hidden, lengths)
