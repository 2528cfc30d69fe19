"""Build a ``tokenizers.Tokenizer`` from a GGUF file's ``tokenizer.ggml.*`` metadata.

Two vocabulary kinds are supported, as llama.cpp names them in ``tokenizer.ggml.model``:

``llama``  SentencePiece BPE: pieces with scores, ``▁`` for spaces, ``<0xNN>`` byte
           fallback. GGUF stores no merges for it, so they are derived: every split of a
           piece into two pieces is a merge, ranked by the piece's score. Merging the
           best-ranked adjacent pair first is exactly SentencePiece's (and llama.cpp's)
           highest-score-bigram-first loop.
``gpt2``   byte-level BPE with explicit merges; text is first split by the regex the
           model was trained with, which ``tokenizer.ggml.pre`` names.

Control tokens become special added tokens and user-defined ones plain added tokens,
so both are matched whole in the text, as llama.cpp does.
"""
from __future__ import annotations

import gc
import logging
from typing import Any, Mapping

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ._spm_merges import cached_spm_merge_ids, merge_pairs

log = logging.getLogger(__name__)

# llama_token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Every numeral character on its own: the Digits(individual_digits) step of these models'
# tokenizer.json, which llama.cpp writes as the regex \p{N}.
_DIGIT = "digits"

# tokenizer.ggml.pre -> (successive split steps, ignore_merges). Each step splits the
# pieces the previous one produced; llama3-style vocabularies look a whole pre-token up
# before merging (ignore_merges), as their reference tokenizers do.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((_GPT2,), False),
    "gpt2": ((_GPT2,), False),
    "gpt-2": ((_GPT2,), False),
    "mpt": ((_GPT2,), False),
    "olmo": ((_GPT2,), False),
    "stablelm2": ((_GPT2,), False),
    "smollm": ((_DIGIT, _GPT2), False),
    "starcoder": ((_DIGIT, _GPT2), False),
    "refact": ((_DIGIT, _GPT2), False),
    "llama-bpe": ((_LLAMA3,), True),
    "llama3": ((_LLAMA3,), True),
    "llama-v3": ((_LLAMA3,), True),
    "smaug-bpe": ((_LLAMA3,), True),
    "dbrx": ((_LLAMA3,), True),
    "falcon3": ((_LLAMA3,), True),
    "pixtral": ((_LLAMA3,), True),
    "qwen2": ((_QWEN2,), False),
    "deepseek-r1-qwen": ((_QWEN2,), False),
    "megrez": ((_QWEN2,), False),
    "tekken": ((_TEKKEN,), False),
    "gpt-4o": ((_GPT4O,), False),
    "llama4": ((_GPT4O,), False),
}

# SentencePiece families whose piece scores do not follow merge order; for them the
# position in the vocabulary is the merge rank (it is also what their HF tokenizer uses).
_RANK_BY_POSITION = {"gemma", "gemma2", "gemma3", "gemma3n"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _special_ids(md: Mapping[str, Any], tokens: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    prefix, suffix = "tokenizer.ggml.", "_token_id"
    for key, value in md.items():
        if key.startswith(prefix) and key.endswith(suffix) and isinstance(value, int):
            role = key[len(prefix):-len(suffix)]
            role = {"unknown": "unk", "padding": "pad", "seperator": "sep", "separator": "sep"}.get(role, role)
            if 0 <= value < len(tokens):
                info[f"{role}_token_id"] = value
                info[f"{role}_token"] = tokens[value]
    return info


def _added_tokens(tokens: list[str], types: np.ndarray, skip: set[int]) -> tuple[list, list]:
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in np.flatnonzero(types == CONTROL).tolist() if i not in skip]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == USER_DEFINED).tolist() if i not in skip]
    return special, user


def _first_index_vocab(pieces: list[str]) -> dict[str, int]:
    """piece -> index of its first occurrence (built from the end, so the first one wins)."""
    n = len(pieces)
    return dict(zip(reversed(pieces), range(n - 1, -1, -1)))


def _build_llama(md: Mapping[str, Any], tokens: list[str], types: np.ndarray, arch: str | None):
    n = len(tokens)
    # Pieces of pure whitespace are sometimes stored with real spaces; text reaches the
    # model with spaces already turned into ▁, so spell them that way or they never match.
    respelled = {i for i, t in enumerate(tokens) if " " in t and not t.strip()}
    pieces = list(tokens)
    for i in respelled:
        pieces[i] = "▁" * len(tokens[i])
    vocab = _first_index_vocab(pieces)
    if arch in _RANK_BY_POSITION:
        rank = None
    else:
        scores = md.get("tokenizer.ggml.scores")
        scores = [0.0] * n if scores is None or len(scores) == 0 else scores
        rank = [-float(s) for s in scores]
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = pieces[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < n else None
    merges = merge_pairs(pieces, *cached_spm_merge_ids(pieces, vocab, rank, types))
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    del merges, vocab
    tok = Tokenizer(model)
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    if prefix:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok, respelled


def _build_gpt2(md: Mapping[str, Any], tokens: list[str], types: list[int]):
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        log.warning("GGUF pre-tokenizer %r is not known; using the GPT-2 split", pre)
    regexes, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    alphabet = bytes_to_unicode()
    allowed = set(alphabet.values())
    respelled = set()
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if types[i] not in (CONTROL, USER_DEFINED) and not set(t) <= allowed:
            # A piece written as plain text: spell its UTF-8 bytes in the byte alphabet.
            t = "".join(alphabet[b] for b in t.encode("utf-8"))
            respelled.add(i)
        vocab.setdefault(t, i)
    merges = []
    for line in md.get("tokenizer.ggml.merges") or []:
        left, sep, right = line.partition(" ")
        if sep:
            merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    splits = [pre_tokenizers.Digits(individual_digits=True) if r == _DIGIT
              else pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Control tokens written with characters outside the byte alphabet are mislabelled
    # pieces, not real specials: adding them would grow the vocabulary past the model's.
    bad = {i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and not set(t) <= allowed}
    return tok, respelled | bad


def _post_processor(tok: Tokenizer, info: dict[str, Any], byte_level: bool):
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    bos = info.get("bos_token") if info["add_bos"] else None
    eos = info.get("eos_token") if info["add_eos"] else None
    if bos is not None or eos is not None:
        def side(seq: str, type_id: int) -> list[str]:
            return ([f"{bos}:{type_id}"] if bos else []) + [f"${seq}:{type_id}"] + ([f"{eos}:{type_id}"] if eos else [])
        specials = [(t, info[f"{r}_token_id"]) for r, t in (("bos", bos), ("eos", eos)) if t is not None]
        steps.append(processors.TemplateProcessing(single=side("A", 0), pair=side("A", 0) + side("B", 1),
                                                   special_tokens=list(dict.fromkeys(specials))))
    if len(steps) == 1:
        tok.post_processor = steps[0]
    elif steps:
        tok.post_processor = processors.Sequence(steps)


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """``(tokenizer, info)`` from GGUF metadata (``GGUFFile.metadata``).

    ``info`` holds ``model``, ``pre``, ``add_bos``, ``add_eos``, ``chat_template``
    (or None), and for every ``tokenizer.ggml.<role>_token_id`` key ``<role>_token_id``
    and ``<role>_token`` (``bos``, ``eos``, ``unk``, ``pad``, ``eot``, ...).
    The tokenizer's post-processor adds BOS/EOS as ``add_bos``/``add_eos`` say, when
    encoding with ``add_special_tokens=True``.
    """
    # Building a large vocabulary makes ~10^6 short-lived tuples; generational collections
    # triggered by them would each walk every object torch and the model hold.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        return _tokenizer_from_gguf(metadata)
    except ValueError:
        raise
    except Exception as exc:
        # The tokenizers library raises plain Exceptions (a merge naming a token that is not
        # in the vocabulary); wrong-typed metadata raises TypeError. Either way the file's
        # tokenizer is invalid, which callers report as a ValueError naming the file.
        raise ValueError(f"invalid GGUF tokenizer metadata ({type(exc).__name__}: {exc})") from exc
    finally:
        if gc_was_on:
            gc.enable()


def _tokenizer_from_gguf(metadata: Mapping[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    tokens = list(tokens)
    types = metadata.get("tokenizer.ggml.token_type")
    types = np.asarray([NORMAL] * len(tokens) if types is None or len(types) == 0 else types, dtype=np.int64)
    if types.shape != (len(tokens),):
        raise ValueError(f"GGUF tokenizer has {len(tokens)} tokens but {types.size} token types")
    arch = metadata.get("general.architecture")
    if kind == "llama":
        tok, skip = _build_llama(metadata, tokens, types, arch)
    elif kind == "gpt2":
        tok, skip = _build_gpt2(metadata, tokens, types.tolist())
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: 'llama', 'gpt2')")
    special, user = _added_tokens(tokens, types, skip)
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    info: dict[str, Any] = {"model": kind, "pre": metadata.get("tokenizer.ggml.pre"),
                            "chat_template": metadata.get("tokenizer.chat_template")}
    info.update(_special_ids(metadata, tokens))
    info["add_bos"] = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos_token" in info
    info["add_eos"] = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in info
    _post_processor(tok, info, kind == "gpt2")
    return tok, info
