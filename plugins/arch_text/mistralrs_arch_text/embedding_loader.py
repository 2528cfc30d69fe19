"""``Which.Embedding``: a sentence-transformers style folder (local or hub) -> EmbeddingPipeline."""
from __future__ import annotations

from mistralrs_core.errors import NotAvailableYet


class EmbeddingLoader:
    def load(self, which, opts, name: str):
        from mistralrs_core.loading.hf_config import load_model_config
        from mistralrs_core.loading.model_loader import detect_architecture, reject_unsupported_fields
        from mistralrs_core.loading.options import pick_device, pick_dtype
        from mistralrs_core.loading.resolve import resolve_model_dir
        from mistralrs_core.pipeline.embedding import EmbeddingPipeline
        from mistralrs_core.tokenization.tokenizer import Tokenizer

        reject_unsupported_fields(which)
        if opts.in_situ_quant is not None:
            raise NotAvailableYet("in_situ_quant for embedding models")
        model_dir = resolve_model_dir(which.model_id, hf_cache_path=which.hf_cache_path,
                                      token_source=opts.token_source)
        device = pick_device(opts.device)
        dtype = pick_dtype(which.dtype, device)
        tokenizer = Tokenizer.from_dir(model_dir, tokenizer_json=which.tokenizer_json)
        hf = load_model_config(model_dir)
        cls = detect_architecture(hf, "embedding", which.arch).load()
        model = cls.load(model_dir, hf, dtype=dtype, device=device)
        return EmbeddingPipeline(name, model, tokenizer)
