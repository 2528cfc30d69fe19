"""Training the AnyMoE gates on the dataset's prompts.

Only the gates learn. The model runs under ``no_grad`` with its own small paged cache (the
engine's pool is not touched); each AnyMoE layer computes its gate with autograd on and
records, per prompt, the mean gate probabilities over the prompt's tokens. The loss of a layer
is the cross-entropy of that mean against the row's expert, ``-log mean_p[expert]`` (upstream
passes the probabilities through ``cross_entropy``, i.e. a second softmax, which squashes the
loss into a narrow band; this is the plain negative log-likelihood). Routing itself is hard
top-1, so no gradient reaches a gate through the experts' outputs, exactly as upstream. One
AdamW per gate (lr from the config, betas 0.9/0.999, eps 1e-8, no weight decay), prompts
shuffled each epoch by a seeded generator, ``batch_size`` prompts per step.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from mistralrs_core.anymoe.layer import StopForward
from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.layers.recurrent import make_layer_cache

log = logging.getLogger("mistralrs")

_BLOCK = 16


def forward_prompts(model, routing, layers: list[int], prompts: list[list[int]]) -> dict:
    """One prefill of ``prompts`` (a batch) through ``model`` with a throwaway KV cache and
    scratch gate sums, up to the last of the AnyMoE ``layers``; returns, per AnyMoE layer,
    the expert of each row."""
    records, nxt = [], 0
    for ids in prompts:
        n = -(-len(ids) // _BLOCK)
        records.append((ids, 0, list(range(nxt, nxt + n))))
        nxt += n
    slotted = bool(getattr(model, "uses_state_slots", False)) or any(
        type(s).__name__ == "RecurrentStateSpec" for s in model.kv_cache_specs())
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    caches = [make_layer_cache(s, nxt, _BLOCK, model.dtype, device, num_slots=len(prompts))
              for s in model.kv_cache_specs()]
    ids, pos, meta = build_metadata(records, _BLOCK, device,
                                    state_slots=list(range(len(prompts))) if slotted else None)
    if slotted:
        meta.fresh_slots = [True] * len(prompts)
    # The layers after the last AnyMoE layer change nothing the gates see.
    with routing.scratch(nxt, _BLOCK, stop_after=max(layers)) as choices:
        try:
            model.forward_embeds(model.embed(ids), pos, meta, caches)
        except StopForward:
            pass
        return dict(choices)


def train(model, routing, layers, samples: list[tuple[list[int], int]], cfg, seed: int) -> list[list[float]]:
    """Train every layer's gate; returns the loss per step per layer."""
    device = layers[0].moe_gate.weight.device
    params = []
    for layer in layers:
        layer.moe_gate.requires_grad_(True)
        params.append(list(layer.moe_gate.parameters()))
    optims = [torch.optim.AdamW(p, lr=float(cfg.lr), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
              for p in params]
    gen = torch.Generator().manual_seed(seed)
    losses: list[list[float]] = []
    try:
        for layer in layers:
            layer.recording = True
        for _ in range(cfg.epochs):
            order = torch.randperm(len(samples), generator=gen).tolist()
            for i in range(0, len(order), cfg.batch_size):
                batch = [samples[j] for j in order[i:i + cfg.batch_size]]
                labels = torch.tensor([e for _, e in batch], device=device)
                with torch.no_grad():
                    forward_prompts(model, routing, [layer.layer for layer in layers], [ids for ids, _ in batch])
                step = []
                for layer, opt in zip(layers, optims):
                    loss = F.nll_loss(layer.recorded.clamp_min(1e-12).log(), labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step.append(float(loss.detach()))
                    layer.recorded = None
                losses.append(step)
    finally:
        for layer in layers:
            layer.recording = False
            layer.recorded = None
            layer.moe_gate.requires_grad_(False)
    log.info("AnyMoE: trained %d gate(s) in %d steps; final losses %s", len(layers), len(losses),
             [round(x, 4) for x in losses[-1]] if losses else [])
    return losses


def write_loss_csv(path: str, losses: list[list[float]]) -> None:
    """Upstream's layout: ``Step, Gating layer 0, ...`` then ``Step i, loss...`` (4 decimals)."""
    try:
        p = Path(path).expanduser()
        if p.parent and not p.parent.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            width = len(losses[0]) if losses else 0
            w.writerow(["Step"] + [f"Gating layer {i}" for i in range(width)])
            for i, row in enumerate(losses):
                w.writerow([f"Step {i}"] + [f"{x:.4f}" for x in row])
    except OSError as exc:
        raise ValueError(f"anymoe_config.loss_csv_path: cannot write {path!r}: {exc.strerror or exc}") from None
