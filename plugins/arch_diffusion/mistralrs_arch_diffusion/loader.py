"""``Which.DiffusionPlain``: a Flux folder (diffusers layout or BFL single files, local or
hub) -> a ``FluxPipeline``. Every component goes through the core weight path
(``load_module``); the transformer's linears see the quantization hook (``in_situ_quant``)."""
from __future__ import annotations

from pathlib import Path

from mistralrs_core.api.enums import DiffusionArchitecture, parse_enum


def load_flux(model_dir: Path, *, name: str, dtype, device, offload: bool, seed: int | None = None,
              quant_config=None, move=None):
    """Build and load every component of the Flux model in ``model_dir``."""
    from mistralrs_core.loading.weights import load_module

    from mistralrs_arch_diffusion.clip_text import CLIPTextConfig, CLIPTextModel
    from mistralrs_arch_diffusion.flux_transformer import FluxConfig, FluxTransformer2DModel
    from mistralrs_arch_diffusion.layout import bfl_transformer_weights, bfl_vae_weights, locate, open_weights
    from mistralrs_arch_diffusion.pipeline import FluxPipeline
    from mistralrs_arch_diffusion.placement import Placement
    from mistralrs_arch_diffusion.prompt_tokenizers import load_clip_tokenizer, load_t5_tokenizer
    from mistralrs_arch_diffusion.scheduler import FlowMatchConfig
    from mistralrs_arch_diffusion.t5 import T5Config, T5EncoderModel
    from mistralrs_arch_diffusion.vae import AutoencoderKLDecoder, VAEConfig

    files = locate(model_dir)
    placement = Placement(device, offload, **({"move": move} if move is not None else {}))
    where = placement.storage
    # Configs and tokenizers first: a broken folder fails before any weight is read.
    flux_cfg = FluxConfig.from_hf(files.config("transformer"))
    vae_cfg = VAEConfig.from_hf(files.config("vae"))
    clip_cfg = CLIPTextConfig.from_hf(files.config("text_encoder"))
    t5_cfg = T5Config.from_hf(files.config("text_encoder_2"))
    sched = FlowMatchConfig.from_hf(files.config("scheduler", "scheduler_config.json"))
    clip_tok = load_clip_tokenizer(files.folder("tokenizer"), clip_cfg.max_position_embeddings)
    t5_tok = load_t5_tokenizer(files.folder("tokenizer_2"))
    if flux_cfg.pooled_projection_dim != clip_cfg.hidden_size or flux_cfg.joint_attention_dim != t5_cfg.d_model:
        raise ValueError("transformer config: pooled_projection_dim / joint_attention_dim do not match the "
                         f"text encoders ({clip_cfg.hidden_size} / {t5_cfg.d_model})")
    if flux_cfg.in_channels != 4 * vae_cfg.latent_channels:
        raise ValueError(f"transformer config: in_channels {flux_cfg.in_channels} is not 4 x the VAE's "
                         f"latent_channels ({vae_cfg.latent_channels})")

    clip = CLIPTextModel(clip_cfg)
    with open_weights(files.folder("text_encoder")) as w:
        load_module(clip, w.items(), device=where, dtype=dtype)
    t5 = T5EncoderModel(t5_cfg)
    with open_weights(files.folder("text_encoder_2")) as w:
        load_module(t5, w.items(), device=where, dtype=dtype)
    # Prepacked for oneDNN when it computes on this CPU in half precision; never for a
    # quantized transformer or one that runs on an accelerator (offloaded: stored here only).
    from mistralrs_core.layers.packed import can_prepack
    packed = quant_config is None and can_prepack(dtype, placement.compute)
    transformer = FluxTransformer2DModel(flux_cfg, packed=packed)
    with open_weights(files.transformer_weights) as w:
        stream = w.items()
        if files.transformer_bfl:
            stream = bfl_transformer_weights(stream, flux_cfg.inner_dim)
        load_module(transformer, stream, device=where, dtype=dtype, quant_config=quant_config)
    if packed:
        transformer.prepack()
    vae = AutoencoderKLDecoder(vae_cfg)
    with open_weights(files.vae_weights) as w:
        stream = w.items()
        if files.vae_bfl:
            stream = bfl_vae_weights(stream, len(vae_cfg.block_out_channels))
        load_module(vae, stream, device=where, dtype=dtype)
    return FluxPipeline(name, clip=clip, clip_tokenizer=clip_tok, t5=t5, t5_tokenizer=t5_tok,
                        transformer=transformer, vae=vae, scheduler=sched, placement=placement, seed=seed)


class DiffusionLoader:
    def load(self, which, opts, name: str):
        from mistralrs_core import capabilities
        from mistralrs_core.loading.options import pick_device, pick_dtype
        from mistralrs_core.loading.quant_config import QuantConfig
        from mistralrs_core.loading.resolve import resolve_model_dir

        from mistralrs_arch_diffusion.layout import HUB_PATTERNS

        arch = parse_enum(DiffusionArchitecture, which.arch, "arch")
        quant = None
        if opts.in_situ_quant is not None:
            capabilities.require("isq", "in_situ_quant")
            quant = QuantConfig.isq(opts.in_situ_quant)
        model_dir = resolve_model_dir(which.model_id, token_source=opts.token_source, allow_patterns=HUB_PATTERNS)
        device = pick_device(opts.device)
        dtype = pick_dtype(which.dtype, device)
        return load_flux(model_dir, name=name, dtype=dtype, device=device,
                         offload=arch is DiffusionArchitecture.FluxOffloaded, seed=opts.seed, quant_config=quant)
