"""X-LoRA: a classifier mixes the LoRA adapters per token and per adapted layer.

Each step runs twice. The scaling pass runs the model with the adapters at the config's
``scaling_pass_value`` (0 by default: the base model) over a second, private paged cache with
the engine's block tables, so the real pass's K/V are never touched and each pass attends to
its own history, as upstream's dual cache does. The classifier turns the scaling pass's final
hidden states into scalings [tokens, layers, adapters] (one row for every layer unless
``layerwise_scalings``; softmax with temperature; optional top-k). The real pass then adds
each adapter's update on every adapted layer weighted by its scaling (``global_scaling_weight``
on top). Layer indices come from the ordering file's ``layers`` (PEFT's module order).

``tgt_non_granular_index=k``: once a sequence has produced k tokens, its scalings are frozen
to those of its last scaled token and, when every sequence of a step is frozen, the scaling
pass is skipped.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F

from mistralrs_core.adapters.lora import AdapterRuntime, ScalingPlan
from mistralrs_core.layers.attention import LayerKVCache

_MAX_TRACKED = 4096


@attrs.frozen
class XLoraConfig:
    hidden_size: int
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    enable_relu: bool = True


def read_xlora_config(path: Path) -> XLoraConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"xlora_model_id: {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable X-LoRA config ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("hidden_size"), int):
        raise ValueError(f"{path}: hidden_size: required (an integer)")
    top_k = raw.get("top_k_lora")
    return XLoraConfig(
        hidden_size=raw["hidden_size"], enable_softmax=bool(raw.get("enable_softmax", True)),
        enable_softmax_topk=bool(raw.get("enable_softmax_topk", False)),
        layerwise_scalings=bool(raw.get("layerwise_scalings", False)),
        softmax_temperature=float(raw.get("softmax_temperature", 1.0)),
        top_k_lora=None if top_k is None else int(top_k),
        scaling_pass_value=float(raw.get("scaling_pass_value", 0.0) or 0.0),
        global_scaling_weight=float(raw.get("global_scaling_weight", 1.0)),
        enable_relu=bool(raw.get("enable_relu_and_dropout", True)))


class XLoraClassifier:
    """hidden [T, H] -> scalings [T, layers, adapters] (dropout is a no-op at inference);
    ``per_layer`` then gives what each adapted layer applies (top-k)."""

    def __init__(self, cfg: XLoraConfig, layers: list[tuple[torch.Tensor, torch.Tensor | None]],
                 n_layers: int, n_classes: int):
        self.cfg, self.layers, self.n_layers, self.n_classes = cfg, layers, n_layers, n_classes

    @classmethod
    def load(cls, path: Path, cfg: XLoraConfig, n_layers: int, n_classes: int, dtype, device) -> "XLoraClassifier":
        from mistralrs_core.adapters.weights import _read_tensors
        tensors = _read_tensors(path)
        found: dict[tuple, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name = key.split("internal_xlora_classifier.", 1)[-1]
            m = re.fullmatch(r"(?:layers|inner)\.(\d+)\.(weight|bias)", name)
            if m is not None:
                found.setdefault((0 if name.startswith("inner") else 1, int(m[1])), {})[m[2]] = t
                continue
            m = re.fullmatch(r"last\.(weight|bias)", name)
            if m is not None:
                found.setdefault((2, 0), {})[m[1]] = t
                continue
            raise ValueError(f"{path}: {key}: not an X-LoRA classifier tensor")
        layers, width = [], cfg.hidden_size
        for key in sorted(found):
            wb = found[key]
            w = wb.get("weight")
            if w is None or w.dim() != 2 or w.shape[1] != width:
                raise ValueError(f"{path}: classifier layer {key[1]}: weight {list(w.shape) if w is not None else None}"
                                 f" does not take {width} inputs (hidden_size {cfg.hidden_size})")
            width = w.shape[0]
            b = wb.get("bias")
            layers.append((w.to(device, dtype), None if b is None else b.to(device, dtype)))
        want = n_classes * n_layers if cfg.layerwise_scalings else n_classes
        if not layers or width != want:
            raise ValueError(f"{path}: the classifier gives {width} outputs; {n_classes} adapters x "
                             f"{n_layers if cfg.layerwise_scalings else 1} layers need {want}")
        return cls(cfg, layers, n_layers, n_classes)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden
        for i, (w, b) in enumerate(self.layers):
            x = F.linear(x.to(w.dtype), w, b)
            if i + 1 < len(self.layers) and self.cfg.enable_relu:
                x = torch.relu(x)
        t = x.shape[0]
        if self.cfg.layerwise_scalings:
            s = x.reshape(t, self.n_layers, self.n_classes)
        else:
            s = x.unsqueeze(1).expand(t, self.n_layers, self.n_classes)
        if self.cfg.enable_softmax:
            s = torch.softmax(s / self.cfg.softmax_temperature, dim=-1)
        return s

    def per_layer(self, s: torch.Tensor) -> torch.Tensor:
        """What each adapted layer applies: top-k of the adapters, optionally re-softmaxed."""
        cfg = self.cfg
        if cfg.top_k_lora is not None:
            idx = torch.topk(s, k=cfg.top_k_lora, dim=-1).indices
            mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
            s = s * mask.to(s.dtype)
        if cfg.enable_softmax_topk:
            nonzero = s != 0
            s = torch.softmax(s.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return s

    def dummy(self, t: int, dtype, device) -> torch.Tensor:
        return self.per_layer(torch.full((t, self.n_layers, self.n_classes), self.cfg.scaling_pass_value,
                                         dtype=dtype, device=device))


class XLoraRuntime(AdapterRuntime):
    def __init__(self, model, adapters, classifier: XLoraClassifier, tgt_non_granular_index: int | None):
        super().__init__(model, adapters, default=[])
        self.classifier = classifier
        self.tgt = tgt_non_granular_index
        # seq id -> [tokens produced before this step, frozen scalings row or None]
        self._seqs: OrderedDict[int, list] = OrderedDict()
        self._shadow: tuple[tuple[int, ...], list] | None = None
        #: the scalings of the latest step (tests and diagnostics)
        self.last_scalings: torch.Tensor | None = None

    def request_adapter(self, adapter) -> str:
        raise ValueError("adapter: an X-LoRA model mixes its adapters itself; a request cannot pick one")

    def shadow_caches(self, caches):
        """The scaling pass's own paged K/V, same shapes and block ids as the engine's."""
        if caches is None:
            return None
        key = tuple(id(c) for c in caches)
        if self._shadow is None or self._shadow[0] != key:
            shadow = []
            for c in caches:
                if c is None:
                    shadow.append(None)
                elif type(c) is LayerKVCache:
                    shadow.append(LayerKVCache(c.spec, c.k.shape[0], c.block_size, c.k.dtype, c.k.device))
                else:
                    raise ValueError("X-LoRA needs a paged K/V cache on every layer (no recurrent state)")
            self._shadow = (key, shadow)
        return self._shadow[1]

    def _wrap_forward(self) -> None:
        model = self.model
        inner = model.forward_embeds

        def forward_embeds(h, positions, meta, caches):
            t = h.shape[0]
            frozen = self._frozen_rows(meta)
            if frozen is None or not all(r is not None for r in frozen):
                value = self.classifier.cfg.scaling_pass_value
                dummy = (ScalingPlan(self.classifier.dummy(t, h.dtype, h.device), self.weight)
                         if value != 0 else None)
                base = self.run_with(dummy, inner, h.clone(), positions, meta, self.shadow_caches(caches))
                s = self.classifier(base).to(h.dtype)
            else:
                s = torch.empty(t, self.classifier.n_layers, self.classifier.n_classes, dtype=h.dtype,
                                device=h.device)
            s = self._apply_frozen(meta, frozen, s)
            self.last_scalings = s
            plan = ScalingPlan(self.classifier.per_layer(s), self.weight)
            self._remember(meta, t, plan, h.device)
            return self.run_with(plan, inner, h, positions, meta, caches)

        model.forward_embeds = forward_embeds
        self._wrap_tail()

    def rows_plan(self, plan, meta, counts, device):
        rows, off = [], 0
        for q, c in zip(meta.query_lens, counts):
            rows.extend(range(off + q - c, off + q))
            off += q
        return ScalingPlan(plan.scalings.index_select(0, torch.tensor(rows, dtype=torch.long, device=device)),
                           plan.weight)

    @property
    def weight(self) -> float:
        return self.classifier.cfg.global_scaling_weight

    def _frozen_rows(self, meta):
        """Per sequence its frozen scalings row, or None while it still gets granular ones."""
        ids = getattr(meta, "seq_ids", None)
        if self.tgt is None or ids is None:
            return None
        out = []
        for sid in ids:
            st = self._seqs.get(sid)
            out.append(st[1] if st is not None and st[0] >= self.tgt else None)
        return out

    def _apply_frozen(self, meta, frozen, s: torch.Tensor) -> torch.Tensor:
        ids, counts = getattr(meta, "seq_ids", None), getattr(meta, "num_logits", None)
        if self.tgt is None or ids is None:
            return s
        s = s.clone()
        off = 0
        for i, (sid, n) in enumerate(zip(ids, meta.query_lens)):
            st = self._seqs.get(sid)
            if st is None:
                st = self._seqs[sid] = [0, None]
            self._seqs.move_to_end(sid)
            if frozen[i] is not None:
                s[off:off + n] = frozen[i]
            else:
                st[1] = s[off + n - 1].clone()
            st[0] += counts[i] if counts is not None else 0
            off += n
        while len(self._seqs) > _MAX_TRACKED:
            self._seqs.popitem(last=False)
        return s
