"""Tokenizer wrapper, streaming detokenizer and chat templates."""

from .chat_template import ChatTemplate, ChatTemplateError, load_template_arg, resolve_chat_template
from .detokenizer import IncrementalDetokenizer
from .eos import generation_eos_ids
from .prompt import apply_chat_template, encode_prompt, render_chat
from .tokenizer import Tokenizer

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "Tokenizer",
    "apply_chat_template",
    "encode_prompt",
    "generation_eos_ids",
    "load_template_arg",
    "render_chat",
    "resolve_chat_template",
]
