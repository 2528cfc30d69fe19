"""A loaded embedding model: validates and tokenizes inputs, embeds them in one batch."""
from __future__ import annotations

import threading

from mistralrs_core.api.validate import normalize_embedding_input, validate_embedding_request
from mistralrs_core.pipeline.base import Embedding

# Above this many padded tokens a request is split into several forwards, so a huge batch
# cannot allocate [B, heads, L, L] attention scores all at once.
_MAX_PADDED_TOKENS = 32768


class EmbeddingPipeline(Embedding):
    kind = "embedding"

    def __init__(self, name: str, model, tokenizer):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    # --- helpers ----------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.model.max_context

    def shutdown(self) -> None:
        self.model = None

    def _encode(self, text: str, truncate: bool, field: str) -> list[int]:
        # tokenizer.json's own post-processor decides the special tokens, as in the reference
        # (Qwen3-Embedding appends <|endoftext|> there and pools on it).
        inner = self.tokenizer.inner
        enc = inner.encode(text, add_special_tokens=False)
        n_special = inner.num_special_tokens_to_add(False)
        limit = self.max_context
        if len(enc.ids) + n_special > limit:
            if not truncate:
                raise ValueError(f"{field}: input is {len(enc.ids) + n_special} tokens, over the model's "
                                 f"maximum context length of {limit}; shorten it or set truncate_sequence=True")
            # Cut the text, keep the special tokens (the last one is what last-token pooling reads).
            enc.truncate(max(limit - n_special, 0))
        return inner.post_process(enc, None, True).ids

    def _check_ids(self, ids: list[int], truncate: bool, field: str) -> list[int]:
        vocab = self.model.vocab_size
        for j, t in enumerate(ids):
            if t >= vocab:
                raise ValueError(f"{field}[{j}]: token id {t} is outside the model's vocabulary "
                                 f"(size {vocab})")
        limit = self.max_context
        if len(ids) > limit:
            if not truncate:
                raise ValueError(f"{field}: input is {len(ids)} tokens, over the model's maximum context "
                                 f"length of {limit}; shorten it or set truncate_sequence=True")
            ids = ids[:limit]
        return ids

    def prepare(self, req) -> list[list[int]]:
        """The token ids of every input of ``req`` (validated, truncated when asked)."""
        validate_embedding_request(req)
        batch = normalize_embedding_input(req.input)
        # A str or one list of ids is a single input: errors name ``input`` itself.
        single = isinstance(req.input, str) or isinstance(req.input[0], int)
        seqs = []
        for i, item in enumerate(batch):
            field = "input" if single else f"input[{i}]"
            ids = (self._encode(item, req.truncate_sequence, field) if isinstance(item, str)
                   else self._check_ids(list(item), req.truncate_sequence, field))
            if not ids:
                raise ValueError(f"{field}: encodes to no tokens")
            seqs.append(ids)
        return seqs

    # --- requests ---------------------------------------------------------
    def embed(self, req) -> list[list[float]]:
        seqs = self.prepare(req)
        if self.model is None:
            raise ValueError(f"model_id: model {self.name!r} is unloaded")
        out: list[list[float]] = []
        with self._lock:
            for group in _groups(seqs):
                out.extend(self.model.embed(group).tolist())
        return out

    def chat(self, req):
        raise ValueError(f"model {self.name!r} is an embedding model; use send_embedding_request")

    def completion(self, req):
        raise ValueError(f"model {self.name!r} is an embedding model; use send_embedding_request")

    # --- tokenizer access -------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The same ids ``embed`` would use for this text.
        return self.tokenizer.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _groups(seqs: list[list[int]]):
    """Consecutive slices whose padded size stays under the budget (usually just one)."""
    start, longest = 0, 0
    for i, s in enumerate(seqs):
        longest_next = max(longest, len(s))
        if i > start and longest_next * (i - start + 1) > _MAX_PADDED_TOKENS:
            yield seqs[start:i]
            start, longest_next = i, len(s)
        longest = longest_next
    yield seqs[start:]
