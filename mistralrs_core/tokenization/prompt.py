"""From chat messages to prompt token ids.

The BOS rule (the usual double-BOS trap): most templates write `{{ bos_token }}`
themselves, and most tokenizers also prepend BOS when asked for special tokens, so
"render, then encode with special tokens" yields BOS twice. We therefore always encode
the rendered text WITHOUT special tokens, then prepend BOS only when the tokenizer
normally adds one and the text did not already start with it. The prompt so gets BOS
exactly once when the model expects it, and never gets a post-processor's EOS appended
(which would end generation before it starts).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .chat_template import ChatTemplate
from .tokenizer import Tokenizer


def render_chat(
    template: ChatTemplate | None,
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    enable_thinking: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    if template is None:
        raise ValueError(
            "this model has no chat template; pass chat_template= or jinja_explicit= to Runner, "
            "or send a pretemplated prompt string"
        )
    if tokenizer.pad_token is not None:
        # transformers hands templates every special token; a few templates read pad_token.
        extra.setdefault("pad_token", tokenizer.pad_token)
    return template.render(
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
        unk_token=tokenizer.unk_token or "",
        enable_thinking=enable_thinking,
        tools=tools,
        **extra,
    )


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode already-templated text following the module's BOS rule."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer.adds_bos and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def apply_chat_template(
    template: ChatTemplate | None,
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    enable_thinking: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **extra: Any,
) -> list[int]:
    text = render_chat(
        template,
        tokenizer,
        messages,
        enable_thinking=enable_thinking,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )
    return encode_prompt(tokenizer, text)
