"""From public request objects to engine inputs: prompts, sampling parameters, limits."""
from __future__ import annotations

from mistralrs_core.api.validate import (normalize_messages, validate_chat_request,
                                         validate_completion_request)
from mistralrs_core.capabilities import check_request
from mistralrs_core.sampling.params import SamplingParams, encode_sequence_breakers


def reject_unavailable(req) -> None:
    """Fields whose capability no installed plugin provides are refused, never ignored
    (the table is ``mistralrs_core.capabilities.KNOWN``)."""
    check_request(req)


def sampling_params(req, tokenizer, generation_config: dict, *, max_tokens: int, n: int,
                    force_logprobs: bool = False) -> SamplingParams:
    breakers = None
    if getattr(req, "dry_multiplier", None):
        words = req.dry_sequence_breakers
        breakers = (encode_sequence_breakers(lambda s: tokenizer.encode(s, add_special_tokens=False), words)
                    if words is not None else
                    encode_sequence_breakers(lambda s: tokenizer.encode(s, add_special_tokens=False)))
    extra = {}
    if getattr(req, "dry_base", None) is not None:
        extra["dry_base"] = req.dry_base
    if getattr(req, "dry_allowed_length", None) is not None:
        extra["dry_allowed_length"] = req.dry_allowed_length
    params = SamplingParams(
        temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias,
        dry_multiplier=req.dry_multiplier, dry_sequence_breakers=breakers or [],
        logprobs=bool(getattr(req, "logprobs", False)) or force_logprobs,
        top_logprobs=getattr(req, "top_logprobs", None),
        max_tokens=max_tokens, stop_token_ids=getattr(req, "stop_token_ids", None) or (),
        stop_strings=tuple(req.stop_seqs or ()), ignore_eos=req.ignore_eos, n=n, **extra)
    return params.with_defaults(generation_config)


__all__ = ["normalize_messages", "validate_chat_request", "validate_completion_request",
           "reject_unavailable", "sampling_params"]
