"""From public request objects to engine inputs: prompts, sampling parameters, limits."""
from __future__ import annotations

from mistralrs_core.api.validate import (normalize_messages, validate_chat_request,
                                         validate_completion_request)
from mistralrs_core.errors import NotAvailableYet
from mistralrs_core.sampling.params import SamplingParams, encode_sequence_breakers


def reject_unavailable(req) -> None:
    """Fields whose capability arrives with a later plugin are refused, never ignored."""
    checks = [
        ("grammar", getattr(req, "grammar", None) is not None, "constrained decoding"),
        ("tool_schemas", bool(getattr(req, "tool_schemas", None)), "tool calling"),
        ("web_search_options", getattr(req, "web_search_options", None) is not None, "web search"),
        ("enable_code_execution", bool(getattr(req, "enable_code_execution", False)), "code execution"),
        ("enable_shell", bool(getattr(req, "enable_shell", False)), "the shell tool"),
        ("max_tool_rounds", getattr(req, "max_tool_rounds", None) is not None, "the agentic tool loop"),
        ("tool_dispatch_url", getattr(req, "tool_dispatch_url", None) is not None, "the agentic tool loop"),
        ("session_id", getattr(req, "session_id", None) is not None, "agentic sessions"),
        ("files", bool(getattr(req, "files", None)), "file outputs"),
        ("input_files", bool(getattr(req, "input_files", None)), "file inputs"),
        ("adapter", getattr(req, "adapter", None) is not None, "LoRA adapters"),
    ]
    for field, present, what in checks:
        if present:
            raise NotAvailableYet(f"{field} ({what})")


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
