"""``Which.VisionPlain``: a Hugging Face directory (local or hub) with config.json,
safetensors, tokenizer, chat template and an image preprocessor config -> a
``VisionPipeline`` (or the family's own pipeline class)."""
from __future__ import annotations

import json
from pathlib import Path

PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_IMAGE_KEYS = ("size", "crop_size", "image_mean", "image_std", "image_processor_type")


def load_preprocessor_config(model_dir: Path) -> dict:
    """The image processor's settings: ``preprocessor_config.json``, else a
    ``processor_config.json`` that holds them (top level, or nested under
    ``image_processor`` in newer exports). A processor config with only the processor's own
    keys (LLaVa's ``patch_size``, ``image_seq_length``) does not count."""
    for name in PREPROCESSOR_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError(f"{name}: expected a JSON object")
        if isinstance(cfg.get("image_processor"), dict):
            return cfg["image_processor"]
        if any(k in cfg for k in _IMAGE_KEYS):
            return cfg
    raise FileNotFoundError(f"no image preprocessor settings in model directory {str(model_dir)!r} (looked for "
                            f"{' and '.join(PREPROCESSOR_FILES)}): a vision model needs them to prepare images")


class VisionLoader:
    def load(self, which, opts, name: str):
        from mistralrs_core.loading.hf_config import load_generation_config
        from mistralrs_core.loading.model_loader import (build_text_model, make_text_pipeline, quantizing_loader,
                                                         reject_unsupported_fields)
        from mistralrs_core.loading.options import pick_device, pick_dtype
        from mistralrs_core.loading.resolve import resolve_model_dir
        from mistralrs_core.tokenization.chat_template import resolve_chat_template
        from mistralrs_core.tokenization.tokenizer import Tokenizer

        from mistralrs_arch_vision.pipeline import VisionPipeline

        reject_unsupported_fields(which)
        # In-situ quantization, a topology, an imatrix or UQFF: the quant plugin builds the
        # model (language model quantized, towers dense); the rest of the pipeline is ours.
        quant = quantizing_loader(which, opts)
        if quant is not None:
            quant.check(which, opts)   # a bad ISQ type fails before any download
        model_dir = resolve_model_dir(which.model_id, hf_cache_path=which.hf_cache_path,
                                      token_source=opts.token_source)
        # Checked before any weight is read: without it no image can be prepared.
        pre_cfg = load_preprocessor_config(model_dir)
        device = pick_device(opts.device)
        dtype = pick_dtype(which.dtype, device)
        asset_dir = model_dir
        if quant is not None:
            model, hf, asset_dir, plan = quant.build_model(model_dir, which, opts, device, kind="vision")
        else:
            model, hf = build_text_model(model_dir, arch=which.arch, dtype=dtype, device=device, kind="vision")
        tokenizer = Tokenizer.from_dir(asset_dir, tokenizer_json=which.tokenizer_json)
        family = model.family
        compile_towers = getattr(model, "compile_for_inference", None)
        if compile_towers is not None:
            compile_towers()
        proc_cls = family.load_processor()
        if proc_cls is None:
            raise ValueError(f"arch: vision family {family.name!r} registers no processor")
        processor = proc_cls.from_pretrained(model=model, hf_config=hf, preprocessor_config=pre_cfg,
                                             tokenizer=tokenizer, model_dir=asset_dir)
        template = resolve_chat_template(asset_dir, tokenizer, opts.chat_template, opts.jinja_explicit)
        gen_cfg = load_generation_config(asset_dir)
        pipeline_cls = family.load_pipeline() or VisionPipeline
        # EOS ids live in text_config for most vision checkpoints; top-level keys still win.
        eos_cfg = {**(hf.get("text_config") or {}), **hf}
        pipe = make_text_pipeline(name, model, tokenizer, template, eos_cfg, gen_cfg, opts, device, pipeline_cls)
        pipe.processor = processor
        pipe.max_edge = which.max_edge
        if quant is not None:
            pipe.re_isq = quant.re_isq(pipe, model_dir, which, opts, plan, kind="vision")
        return pipe
