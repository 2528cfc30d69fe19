"""``Which.Speech``: a Dia model directory (transformers 5 or original layout) plus a DAC
codec directory -> a ``DiaPipeline``.

Both models are built on the meta device and filled by the core's one weight path
(``load_module``); layout differences are rewritten in the weight stream (``weights.py``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mistralrs_core.layers.packed import prepack_linears
from mistralrs_core.loading.hf_config import load_generation_config, load_model_config
from mistralrs_core.loading.safetensors_io import SafetensorsWeights
from mistralrs_core.loading.weights import load_module

from mistralrs_arch_speech.dac import DacCodec, DacDecoderConfig
from mistralrs_arch_speech.dia import DiaModel
from mistralrs_arch_speech.dia_config import DiaConfig
from mistralrs_arch_speech.weights import (_G_SUFFIXES, _V_SUFFIXES, dac_original_blocks, dac_original_name,
                                           dia_original_weights, fold_weight_norm, is_dac_original)


def load_dia(model_dir: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> DiaModel:
    model_dir = Path(model_dir)
    cfg = DiaConfig.from_hf(load_model_config(model_dir))
    with torch.device("meta"):
        model = DiaModel(cfg, dtype)
    weights = SafetensorsWeights(model_dir)
    stream = weights.items()
    if cfg.layout == "original":
        stream = dia_original_weights(stream, cfg.channels)
    load_module(model, stream, device=device, dtype=dtype)
    # Non-persistent buffers were built on meta: rebuild them where the weights are.
    model.decoder.embeddings.offsets = torch.arange(cfg.channels, device=device) * cfg.audio_vocab
    # A frame step is 2 rows per request: bf16 weights stream at memory speed on CPU only
    # through a small-M kernel (the quant plugin's) or oneDNN's packed layout, which then
    # serves where no kernel is registered (a no-op for float32 and on CUDA).
    prepack_linears(model, small_m=True)
    return model.eval()


def _dac_sampling_rate(model_dir: Path) -> int:
    path = model_dir / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
        for key in ("sampling_rate", "sample_rate"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return 44100


def load_dac(model_dir: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> DacCodec:
    model_dir = Path(model_dir)
    weights = SafetensorsWeights(model_dir)
    names = weights.names()
    rename = (lambda n: n)
    if is_dac_original(names):
        blocks = dac_original_blocks(names)
        rename = (lambda n: dac_original_name(n, blocks))
    # Shapes as the module will see them: renamed, weight-norm pairs as their v tensor.
    shapes = {}
    for raw in names:
        name = rename(raw)
        if name is None or name.endswith(_G_SUFFIXES):
            continue
        for s in _V_SUFFIXES:
            if name.endswith(s):
                name = name[: -len(s)] + ".weight"
        shapes[name] = weights.shape(raw)
    cfg = DacDecoderConfig.from_shapes(shapes, _dac_sampling_rate(model_dir))
    codec = DacCodec(cfg, dtype)
    # Only the decoding half's tensors are read (the encoder's are never loaded).
    keep = [n for n in names if rename(n) is not None and DacCodec.map_weight_name(rename(n)) is not None]
    stream = fold_weight_norm((rename(n), t) for n, t in weights.items(keep))
    load_module(codec, stream, device=device, dtype=dtype)
    return codec.eval()


class SpeechLoader:
    def load(self, which, opts, name: str):
        from mistralrs_core.loading.model_loader import reject_unsupported_fields
        from mistralrs_core.loading.options import pick_device, pick_dtype
        from mistralrs_core.loading.resolve import resolve_model_dir

        from mistralrs_arch_speech.engine import SpeechEngine
        from mistralrs_arch_speech.pipeline import DiaPipeline
        from mistralrs_arch_speech.sampling import SpeechSampling

        reject_unsupported_fields(which)
        arch = getattr(which.arch, "name", which.arch)
        if arch != "Dia":
            raise ValueError(f"arch: speech architecture {arch!r} is not supported (supported: Dia)")
        if not which.dac_model_id:
            raise ValueError("dac_model_id: Dia needs the DAC codec to turn its audio codes into sound; "
                             "give the codec's directory or hub id (e.g. descript/dac_44khz)")
        if opts.in_situ_quant is not None:
            from mistralrs_core.errors import NotAvailableYet
            raise NotAvailableYet("in_situ_quant for speech models", "the speech loader keeps weights dense")
        model_dir = resolve_model_dir(which.model_id, token_source=opts.token_source)
        try:
            dac_dir = resolve_model_dir(which.dac_model_id, token_source=opts.token_source)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"dac_model_id: {exc}") from None
        device = pick_device(opts.device)
        # Dia follows the core's dtype rule (Auto: bf16 where matmuls are fast in it). The
        # codec stays float32: it runs once per request, and its Snake activations
        # (sin(alpha x)^2 / alpha with small alphas) lose the waveform's detail in bf16.
        model = load_dia(model_dir, pick_dtype(which.dtype, device), device)
        try:
            codec = load_dac(dac_dir, torch.float32, device)
        except ValueError as exc:
            raise ValueError(f"dac_model_id: {exc}") from None
        max_frames = model.cfg.decoder.max_positions - model.cfg.max_delay
        sampling = SpeechSampling.from_generation_config(load_generation_config(model_dir), max_frames)
        engine = SpeechEngine(model, max_seqs=opts.max_seqs, seed=opts.seed)
        return DiaPipeline(name, model, codec, engine, sampling)

