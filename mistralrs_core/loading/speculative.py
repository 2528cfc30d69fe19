"""Wiring speculative decoding onto a loaded target: ``Runner(which_draft=, speculative_gamma=)``
loads a draft model, ``Runner(speculative_ngram=)`` uses prompt lookup (no draft model).

The drafters themselves live in ``engine/speculative.py``; this module checks that the pair
can work (same tokenizer, a KV cache that can roll back) and hands the drafter to the
target's engine. It runs again whenever the target is (re)loaded.
"""
from __future__ import annotations

from typing import Any

import attrs

from mistralrs_core.engine.speculative import DraftModelDrafter, PromptLookupDrafter


@attrs.frozen
class SpeculativeConfig:
    gamma: int
    which_draft: Any = None           # a Which for the draft model
    ngram: int | None = None          # prompt lookup: the longest n-gram matched

    @classmethod
    def from_runner_args(cls, which_draft, speculative_gamma, speculative_ngram) -> "SpeculativeConfig | None":
        if which_draft is None and speculative_ngram is None:
            return None
        if which_draft is not None and speculative_ngram is not None:
            raise ValueError("speculative_ngram: prompt lookup replaces the draft model; "
                             "pass which_draft or speculative_ngram, not both")
        if isinstance(speculative_gamma, bool) or not isinstance(speculative_gamma, int) or speculative_gamma < 1:
            raise ValueError(f"speculative_gamma: must be an integer >= 1, got {speculative_gamma!r}")
        if speculative_ngram is not None and (isinstance(speculative_ngram, bool)
                                              or not isinstance(speculative_ngram, int) or speculative_ngram < 1):
            raise ValueError(f"speculative_ngram: the longest n-gram to look up, an integer >= 1; "
                             f"got {speculative_ngram!r}")
        return cls(gamma=speculative_gamma, which_draft=which_draft, ngram=speculative_ngram)

    @property
    def field(self) -> str:
        return "which_draft" if self.which_draft is not None else "speculative_ngram"


def _vocab_width(model, tokenizer) -> int:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "vocab_size", None) or len(tokenizer)


def check_same_tokenizer(target, draft) -> None:
    """Draft token ids are fed to the target as they are, so both must mean the same thing."""
    tv, dv = target.get_vocab(with_added_tokens=True), draft.get_vocab(with_added_tokens=True)
    if tv == dv:
        return
    differ = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])[:3]
    raise ValueError(f"which_draft: the draft model's tokenizer differs from the target's "
                     f"({len(dv)} vs {len(tv)} tokens; e.g. {differ}); speculative decoding needs "
                     f"the same vocabulary on both sides")


def attach_speculation(pipeline, cfg: SpeculativeConfig, opts, name: str) -> None:
    """Give the target pipeline's engine a drafter. Raises ValueError (naming the Runner
    argument) for a pair that cannot be verified exactly."""
    from mistralrs_core.runner import load_pipeline

    from mistralrs_core.pipeline.base import TEXT_KINDS

    engine = getattr(pipeline, "engine", None)
    if getattr(pipeline, "kind", None) not in TEXT_KINDS or engine is None:
        raise ValueError(f"{cfg.field}: speculative decoding needs a text-generation target, "
                         f"got a {getattr(pipeline, 'kind', type(pipeline).__name__)} model")
    if engine.slotted:
        raise ValueError(f"{cfg.field}: the target keeps per-sequence state outside the paged KV cache "
                         f"(recurrent layers or cross-attention state), which cannot be rolled back "
                         f"past rejected drafts")
    if engine.config.no_kv_cache:
        raise ValueError(f"{cfg.field}: speculative decoding verifies drafts against the KV cache; "
                         f"it cannot run with no_kv_cache=True")
    if cfg.ngram is not None:
        # Single-token matches ("the", ",") mostly propose noise that costs verification rows
        # (SmolLM2 summary: twice the drafted tokens for 15% more kept), so they count only
        # when asked for with speculative_ngram=1.
        engine.drafter = PromptLookupDrafter(cfg.gamma, max_ngram=cfg.ngram, min_ngram=min(2, cfg.ngram),
                                             max_context=engine.max_context)
        return
    draft = load_pipeline(cfg.which_draft, opts, f"{name}-draft")
    try:
        if getattr(draft, "kind", None) not in TEXT_KINDS:
            raise ValueError(f"which_draft: the draft must be a text-generation model, got a {draft.kind} model")
        check_same_tokenizer(pipeline.tokenizer, draft.tokenizer)
        if draft.engine.slotted:
            raise ValueError("which_draft: the draft model keeps recurrent state, which cannot be rolled back "
                             "past rejected drafts")
        model = draft.model
        dcfg, tcfg = draft.engine.config, engine.config
    finally:
        # The draft runs inside the target's engine step, with its own pool below; the
        # pipeline's own engine thread is not needed.
        draft.shutdown()
    spare = tcfg.max_seqs * -(-(cfg.gamma + 1) // tcfg.block_size)
    engine.drafter = DraftModelDrafter(
        model, cfg.gamma, num_blocks=tcfg.num_blocks + spare, block_size=tcfg.block_size,
        device=dcfg.device, cache_dtype=dcfg.cache_dtype, eos_ids=engine.eos_ids,
        max_context=engine.max_context, max_batch_tokens=tcfg.max_batch_tokens,
        prefix_cache=tcfg.prefix_cache, target_vocab=_vocab_width(pipeline.model, pipeline.tokenizer))
