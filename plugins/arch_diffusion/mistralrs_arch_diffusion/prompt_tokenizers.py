"""The two prompt tokenizers of a Flux folder, through ``tokenizers``: fixed-length ids
(truncated with the end token kept, then padded), as the text encoders were trained on.

* CLIP (``tokenizer/``): ``tokenizer.json`` when present, else built from ``vocab.json`` +
  ``merges.txt`` (Black Forest Labs' repositories ship only those): lower-cased NFC text,
  CLIP's word split, byte-level BPE with ``</w>`` word ends, ``<|startoftext|>`` ...
  ``<|endoftext|>`` around the ids.
* T5 (``tokenizer_2/``): the SentencePiece-Unigram ``tokenizer.json``, ``</s>`` appended.
"""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _special(cfg: dict, name: str, default: str | None) -> str | None:
    value = cfg.get(name, default)
    if isinstance(value, dict):
        value = value.get("content", default)
    return value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


class PromptTokenizer:
    """``encode(prompt) -> list[int]`` of exactly ``max_length`` ids."""

    def __init__(self, tok: tokenizers.Tokenizer, pad_token: str, max_length: int, where: str):
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{where}: the padding token {pad_token!r} is not in the vocabulary")
        self.max_length = max_length
        self.tok = tok
        self.pad_id = pad_id
        tok.no_padding()
        tok.no_truncation()
        self._pad_token = pad_token

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        n = max_length or self.max_length
        self.tok.enable_truncation(n)
        try:
            ids = self.tok.encode(text).ids
        finally:
            self.tok.no_truncation()
        return ids + [self.pad_id] * (n - len(ids))


def _tokenizer_config(folder: Path) -> dict:
    return {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}


def load_clip_tokenizer(folder: Path, max_length: int = 77) -> PromptTokenizer:
    folder = Path(folder)
    cfg = _tokenizer_config(folder)
    bos = _special(cfg, "bos_token", "<|startoftext|>")
    eos = _special(cfg, "eos_token", "<|endoftext|>")
    pad = _special(cfg, "pad_token", eos)
    unk = _special(cfg, "unk_token", eos)
    max_length = min(int(cfg.get("model_max_length", max_length) or max_length), max_length)
    if (folder / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        if not vocab_file.is_file() or not merges_file.is_file():
            raise FileNotFoundError(f"CLIP tokenizer folder {str(folder)!r} has neither tokenizer.json nor "
                                    "vocab.json + merges.txt")
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        merges = []
        for line in merges_file.read_text(encoding="utf-8").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            merges.append(tuple(line.split()))
        tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                       end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        for special in (bos, eos):
            if tok.token_to_id(special) is None:
                raise ValueError(f"{str(vocab_file)!r}: special token {special!r} is missing")
        tok.post_processor = processors.RobertaProcessing((eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)),
                                                          trim_offsets=False, add_prefix_space=False)
    return PromptTokenizer(tok, pad, max_length, str(folder))


def load_t5_tokenizer(folder: Path, max_length: int = 512) -> PromptTokenizer:
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"T5 tokenizer folder {str(folder)!r} has no tokenizer.json (the SentencePiece "
                                "model alone is not read)")
    cfg = _tokenizer_config(folder)
    tok = tokenizers.Tokenizer.from_file(str(path))
    limit = cfg.get("model_max_length")
    # Configs without a limit store a huge sentinel (int(1e30)).
    if isinstance(limit, int) and 0 < limit < max_length:
        max_length = limit
    return PromptTokenizer(tok, _special(cfg, "pad_token", "<pad>"), max_length, str(folder))
