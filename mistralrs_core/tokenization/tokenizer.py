"""A thin wrapper over `tokenizers.Tokenizer` that also knows the model's special tokens.

tokenizer.json alone does not say which token ends a turn or whether BOS is prepended;
that lives in tokenizer_config.json (HF directories) or GGUF metadata, so both loaders
build this one object and the engine never looks at either source again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers

from ..loading.hf_config import load_json
from .token_bytes import DecoderTraits, piece_to_bytes


def _token_content(value: Any) -> str | None:
    """Special tokens in configs are plain strings or serialized AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _named_templates(value: Any) -> dict[str, str]:
    """tokenizer_config's chat_template: one string, or a list of {name, template}."""
    if isinstance(value, str):
        return {"default": value}
    out: dict[str, str] = {}
    if isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping) and isinstance(item.get("template"), str):
                out[str(item.get("name") or "default")] = item["template"]
    elif isinstance(value, Mapping):
        out = {str(k): v for k, v in value.items() if isinstance(v, str)}
    return out


def _pick_default(templates: Mapping[str, str]) -> str | None:
    if not templates:
        return None
    return templates.get("default", next(iter(templates.values())))


class Tokenizer:
    """Encode/decode plus the special-token facts generation needs.

    `add_bos` / `add_eos`: None keeps whatever tokenizer.json's post-processor does;
    True/False overrides it (as transformers does when tokenizer_config sets
    add_bos_token / add_eos_token, and as GGUF's tokenizer.ggml.add_bos_token says).
    """

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        chat_template: str | None = None,
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_ids: Iterable[int] = (),
        source: str | None = None,
    ):
        # Engine-side inputs are never silently cut or padded; over-long prompts are
        # handled (error or truncate_sequence) by the engine, which knows the context size.
        if tok.truncation is not None:
            tok.no_truncation()
        if tok.padding is not None:
            tok.no_padding()
        self._tok = tok
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self._add_bos = add_bos
        self._add_eos = add_eos
        templates = dict(chat_templates or {})
        if chat_template is not None:
            templates["default"] = chat_template
        self.chat_templates: dict[str, str] = templates
        self._traits = DecoderTraits.of(tok)
        self._bytes_cache: dict[int, bytes] = {}
        self._eos_ids: set[int] = set()
        if eos_token is not None and (eid := tok.token_to_id(eos_token)) is not None:
            self._eos_ids.add(eid)
        self._eos_ids.update(int(i) for i in extra_eos_ids)
        added = tok.get_added_tokens_decoder()
        self._added_ids = set(added)
        self._special_ids = {i for i, t in added.items() if t.special}
        for s in (bos_token, eos_token, unk_token, pad_token):
            if s is not None and (sid := tok.token_to_id(s)) is not None:
                self._special_ids.add(sid)
        self._detected_add_bos: bool | None = None

    # construction ---------------------------------------------------------------------

    @classmethod
    def from_tokenizers(
        cls,
        tok: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> "Tokenizer":
        return cls(
            tok,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template=chat_template,
            extra_eos_ids=extra_eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, tokenizer_json: str | os.PathLike | None = None) -> "Tokenizer":
        """Load tokenizer.json (or `tokenizer_json`) plus tokenizer_config.json from a model dir."""
        directory = Path(model_dir)
        if tokenizer_json is not None:
            path = Path(tokenizer_json).expanduser()
            if not path.is_file() and (directory / path).is_file():
                path = directory / path
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file {str(tokenizer_json)!r} (from tokenizer_json) does not exist")
        else:
            path = directory / "tokenizer.json"
            if not path.is_file():
                hint = ""
                if (directory / "tokenizer.model").is_file():
                    hint = (
                        " It has only a SentencePiece tokenizer.model; convert it once with "
                        "transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) or "
                        "pass tokenizer_json="
                    )
                else:
                    hint = " Pass tokenizer_json= with the path of a tokenizer.json file."
                raise FileNotFoundError(f"no tokenizer.json found in {str(directory)!r}.{hint}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the Rust error types are not importable
            raise ValueError(f"cannot load tokenizer {str(path)!r}: {exc}") from None

        config = cls._read_optional(directory / "tokenizer_config.json")
        special_map = cls._read_optional(directory / "special_tokens_map.json")

        def special(name: str) -> str | None:
            return _token_content(config.get(name)) or _token_content(special_map.get(name))

        templates = _named_templates(config.get("chat_template"))
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            templates["default"] = jinja_file.read_text(encoding="utf-8")

        add_bos = config.get("add_bos_token")
        add_eos = config.get("add_eos_token")
        # transformers rewrites the post-processor as soon as either flag is given,
        # treating the missing one as False; mirror that so prompts tokenize identically.
        if add_bos is not None or add_eos is not None:
            add_bos, add_eos = bool(add_bos), bool(add_eos)
        return cls(
            tok,
            bos_token=special("bos_token"),
            eos_token=special("eos_token"),
            unk_token=special("unk_token"),
            pad_token=special("pad_token"),
            add_bos=add_bos,
            add_eos=add_eos,
            chat_templates=templates,
            source=str(path),
        )

    @staticmethod
    def _read_optional(path: Path) -> dict:
        if not path.is_file():
            return {}
        data = load_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{str(path)!r} must hold a JSON object")
        return data

    # encoding -------------------------------------------------------------------------

    @property
    def inner(self) -> tokenizers.Tokenizer:
        return self._tok

    def _wrap(self, ids: list[int]) -> list[int]:
        bos, eos = self.bos_token_id, self.eos_token_id
        if self._add_bos and bos is not None:
            ids = [bos, *ids]
        if self._add_eos and eos is not None:
            ids = [*ids, eos]
        return ids

    def _explicit(self) -> bool:
        return self._add_bos is not None or self._add_eos is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
        if add_special_tokens and self._explicit():
            # The flags decide alone: encoding raw and wrapping once means a post-processor
            # that already adds BOS can never produce it twice.
            return self._wrap(self._tok.encode(text, add_special_tokens=False).ids)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        if add_special_tokens and self._explicit():
            return [self._wrap(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    @property
    def adds_bos(self) -> bool:
        """Whether encode(..., add_special_tokens=True) starts with BOS."""
        if self._add_bos is not None:
            return bool(self._add_bos) and self.bos_token_id is not None
        if self._detected_add_bos is None:
            bos = self.bos_token_id
            ids = self._tok.encode("a", add_special_tokens=True).ids
            self._detected_add_bos = bos is not None and bool(ids) and ids[0] == bos
        return self._detected_add_bos

    # decoding -------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            # Our special set is wider than tokenizers' own (it adds BOS/EOS/PAD even when
            # tokenizer.json forgot to flag them), as transformers' skip does.
            ids = [i for i in ids if i not in self._special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=with_added_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (for logprobs); b"" for an unknown id."""
        token_id = int(token_id)
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            out = piece.encode("utf-8")
        else:
            out = piece_to_bytes(piece, self._traits)
        self._bytes_cache[token_id] = out
        return out

    # special tokens -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._added_ids
        return max(size, max(added) + 1) if added else size

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self._eos_ids)

    def add_eos_ids(self, ids: Iterable[int]) -> None:
        """Extra ids that end generation (generation_config / config eos_token_id, turn-end tokens)."""
        self._eos_ids |= {int(i) for i in ids if i is not None}

    @property
    def special_ids(self) -> set[int]:
        return set(self._special_ids)

    @property
    def chat_template(self) -> str | None:
        return _pick_default(self.chat_templates)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"source={self.source!r})"
        )
