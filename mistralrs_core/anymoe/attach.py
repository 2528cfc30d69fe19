"""Turning a loaded text pipeline's model into an AnyMoE model (runs again on every reload).

Order: find the MLPs at the configured layers, build the experts (failing before the model is
touched), swap each MLP for an ``AnyMoeMlp`` whose expert 0 is the original, then train the
gates (or install the saved / previously trained ones), and finally point the running-sum
tables at the engine's block pool. The engine is idle throughout: the Runner has not returned.
"""
from __future__ import annotations

import logging

import torch

from mistralrs_core.anymoe.dataset import load_rows
from mistralrs_core.anymoe.experts import PeftAdapter, find_mlps, fine_tuned_expert, lora_expert
from mistralrs_core.anymoe.gates import gate_tensors, install_gates, read_gates, save_gates
from mistralrs_core.anymoe.layer import AnyMoeMlp, Routing, install_routing
from mistralrs_core.anymoe.setup import AnyMoeSetup
from mistralrs_core.anymoe.training import forward_prompts, train, write_loss_csv
from mistralrs_core.api.config import AnyMoeExpertType

log = logging.getLogger("mistralrs")


class AnyMoeModel:
    """What the pipeline keeps about its AnyMoE layers (``pipeline.anymoe``)."""

    def __init__(self, model, routing: Routing, layers: list[AnyMoeMlp], tokenizer, template):
        self.model = model
        self.routing = routing
        self.layers = layers
        self._tokenizer, self._template = tokenizer, template

    @property
    def layer_indices(self) -> list[int]:
        return [layer.layer for layer in self.layers]

    def prompt_ids(self, prompt: str) -> list[int]:
        """A dataset prompt as the gate sees it: a user turn through the chat template with
        the generation prompt appended (upstream), raw text when there is no template."""
        from mistralrs_core.tokenization.prompt import apply_chat_template, encode_prompt
        if self._template is None:
            return encode_prompt(self._tokenizer, prompt)
        return apply_chat_template(self._template, self._tokenizer, [{"role": "user", "content": prompt}])

    @torch.inference_mode()
    def route(self, prompt: str) -> list[int]:
        """Per AnyMoE layer, the expert the prompt's last token is routed to (the expert the
        gate picks for the whole prompt). Runs in the caller's thread on its own cache and
        scratch sums, so the engine may keep serving meanwhile."""
        choices = forward_prompts(self.model, self.routing, self.layer_indices, [self.prompt_ids(prompt)])
        return [int(choices[layer.layer][-1]) for layer in self.layers]


def _resolve(model_id: str, opts, where: str):
    from mistralrs_core.loading.resolve import resolve_model_dir
    try:
        return resolve_model_dir(model_id, token_source=opts.token_source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _build_experts(model, mlps: dict, layers: list[int], setup: AnyMoeSetup, opts) -> dict[int, list]:
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    from mistralrs_core.loading.weights import weight_index
    cfg = setup.config
    lora = isinstance(cfg.expert_type, AnyMoeExpertType.LoraAdapter)
    index = weight_index(model) if lora else None
    experts: dict[int, list] = {n: [] for n in layers}
    for k, model_id in enumerate(cfg.model_ids):
        where = f"anymoe_config.model_ids[{k}] ({model_id!r})"
        directory = _resolve(model_id, opts, where)
        if lora:
            source = PeftAdapter(directory, where)
        else:
            try:
                source = SafetensorsWeights(directory)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{where}: {exc}") from None
        for n in layers:
            parent, _, base = mlps[n]
            if lora:
                e = lora_expert(model, parent, base, n, cfg.prefix, cfg.mlp, source, cfg.expert_type,
                                k + 1, index, where)
            else:
                e = fine_tuned_expert(model, parent, base, n, cfg.prefix, cfg.mlp, source, k + 1, where)
            experts[n].append(e)
    return experts


def _check_hidden_size(model, base, hidden: int) -> None:
    expected = getattr(getattr(model, "cfg", None), "hidden_size", None)
    if expected is None:
        first = next((m for m in base.modules() if hasattr(m, "in_features")), None)
        expected = getattr(first, "in_features", None)
    if expected is not None and expected != hidden:
        raise ValueError(f"anymoe_config.hidden_size: is {hidden}, but the model's hidden size is {expected}")


def attach_anymoe(pipeline, setup: AnyMoeSetup, opts) -> AnyMoeModel:
    from mistralrs_core.pipeline.base import TEXT_KINDS
    cfg = setup.config
    model = getattr(pipeline, "model", None)
    engine = getattr(pipeline, "engine", None)
    if getattr(pipeline, "kind", None) not in TEXT_KINDS or model is None or engine is None:
        raise ValueError(f"anymoe_config: AnyMoE needs a text-generation model, got a "
                         f"{getattr(pipeline, 'kind', type(pipeline).__name__)} model")
    mlps = find_mlps(model, cfg.prefix, cfg.mlp)
    if not mlps:
        raise ValueError(f"anymoe_config.prefix: the model has no modules named "
                         f"'{cfg.prefix}.<N>.{cfg.mlp}' (check prefix and mlp: for "
                         f"'model.layers.0.mlp.down_proj.weight' they are 'model.layers' and 'mlp')")
    count = max(mlps) + 1
    layers = setup.layers or sorted(mlps)
    for n in layers:
        if n not in mlps:
            raise ValueError(f"anymoe_config.layers: layer {n} is out of range; the model has {count} "
                             f"layers '{cfg.prefix}.<N>.{cfg.mlp}' (0..{count - 1})")
    if any(isinstance(m[2], AnyMoeMlp) for m in mlps.values()):
        raise ValueError("anymoe_config: the model is already an AnyMoE model")
    _check_hidden_size(model, mlps[layers[0]][2], cfg.hidden_size)
    rows = load_rows(cfg.dataset_json, setup.num_experts) if cfg.training and setup.gates is None else None
    saved = read_gates(cfg.gate_model_id, opts.token_source) if not cfg.training and setup.gates is None else None

    experts = _build_experts(model, mlps, layers, setup, opts)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    seed = opts.seed if opts.seed is not None else 0
    gen = torch.Generator().manual_seed(seed)
    routing = Routing()
    moe_layers = []
    for n in layers:
        parent, attr, base = mlps[n]
        layer = AnyMoeMlp([base, *experts[n]], cfg.hidden_size, n, routing, device, generator=gen)
        layer.__dict__["hf_name"] = f"{cfg.prefix}.{n}.{cfg.mlp}"
        setattr(parent, attr, layer)
        moe_layers.append(layer)
    install_routing(model, routing)
    # A fused decode step (quant plugin) runs the dense MLPs it captured; it must not bypass ours.
    model.fast_forward = None
    moe = AnyMoeModel(model, routing, moe_layers, pipeline.tokenizer, getattr(pipeline, "template", None))

    if setup.gates is not None:
        install_gates(moe_layers, setup.gates, "the gate trained at the first load")
    elif saved is not None:
        install_gates(moe_layers, saved, cfg.gate_model_id)
        log.info("AnyMoE: loaded the gate of %d layer(s) from %s", len(moe_layers), cfg.gate_model_id)
    else:
        samples = []
        for i, (prompt, expert) in enumerate(rows):
            try:
                ids = moe.prompt_ids(prompt)
            except ValueError as exc:       # the chat template refused it
                raise ValueError(f"anymoe_config.dataset_json: rows[{i}].prompt: {exc}") from None
            if len(ids) > model.max_context_len:
                raise ValueError(f"anymoe_config.dataset_json: rows[{i}].prompt is {len(ids)} tokens, over the "
                                 f"model's context of {model.max_context_len}")
            samples.append((ids, expert))
        log.info("AnyMoE: training %d gate(s), %d experts each, on %d prompts (lr %g, %d epochs, batch %d)",
                 len(moe_layers), setup.num_experts, len(samples), cfg.lr, cfg.epochs, cfg.batch_size)
        setup.losses = train(model, routing, moe_layers, samples, cfg, seed)
        if cfg.loss_csv_path:
            write_loss_csv(cfg.loss_csv_path, setup.losses)
        if cfg.gate_model_id:
            path = save_gates(gate_tensors(moe_layers), cfg.gate_model_id)
            log.info("AnyMoE: saved the trained gate to %s", path)
    setup.gates = gate_tensors(moe_layers)

    ec = engine.config
    routing.block_size = ec.block_size
    for layer in moe_layers:
        layer.bind_pool(ec.num_blocks, ec.block_size, device)
    pipeline.anymoe = moe
    return moe
