"""Which token ids end generation.

tokenizer_config's eos_token is often the end-of-document token, while chat models stop
at an end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...) named only in
generation_config.json or in the chat template itself.
"""

from __future__ import annotations

from typing import Mapping

from ..loading.hf_config import config_eos_token_ids
from .chat_template import ChatTemplate
from .tokenizer import Tokenizer

# Turn terminators of widespread template families; used only when both the vocabulary
# has the token and the model's template writes it.
TURN_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|end_of_text|>", "<|end|>", "<|eot_id|>", "<|eom_id|>")


def generation_eos_ids(
    tokenizer: Tokenizer,
    template: ChatTemplate | None = None,
    generation_config: Mapping | None = None,
    model_config: Mapping | None = None,
) -> set[int]:
    ids = set(tokenizer.eos_token_ids)
    model_config = dict(model_config or {})
    # Multimodal checkpoints keep the text model's ids in text_config; top-level keys win.
    if isinstance(model_config.get("text_config"), Mapping):
        model_config = {**model_config["text_config"], **model_config}
    ids |= config_eos_token_ids(dict(generation_config or {}), model_config)
    if template is not None:
        for token in TURN_END_TOKENS:
            tid = tokenizer.token_to_id(token)
            if tid is not None and token in template.source:
                ids.add(tid)
    vocab = tokenizer.vocab_size
    return {i for i in ids if 0 <= i < vocab}
