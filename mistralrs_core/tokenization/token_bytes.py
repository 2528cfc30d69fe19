"""Recovering the raw bytes behind a vocabulary entry.

Tokenizers store pieces in an encoded alphabet: byte-level BPE maps every byte to a
printable code point (GPT-2's table), SentencePiece writes spaces as "▁" and unknown
bytes as "<0xAB>". Logprob responses report the real bytes, so we undo those encodings.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

_BYTE_FALLBACK_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPIECE_SPACE = "\u2581"


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest
    (controls, space, some Latin-1) to code points from 256 upward, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table: dict[str, int] = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


class DecoderTraits:
    """What a tokenizer's decoder chain does, read from its JSON description."""

    def __init__(self, decoder_json: dict | None):
        self.byte_level = False
        self.byte_fallback = False
        self.space_marker: str | None = None
        self.wordpiece_prefix: str | None = None
        if decoder_json:
            self._walk(decoder_json)

    def _walk(self, node: dict) -> None:
        kind = node.get("type")
        if kind == "Sequence":
            for child in node.get("decoders", []):
                self._walk(child)
        elif kind == "ByteLevel":
            self.byte_level = True
        elif kind == "ByteFallback":
            self.byte_fallback = True
        elif kind == "Metaspace":
            self.space_marker = node.get("replacement", SPIECE_SPACE)
        elif kind == "Replace":
            pattern = node.get("pattern", {})
            if isinstance(pattern, dict) and pattern.get("String") and node.get("content") == " ":
                self.space_marker = pattern["String"]
        elif kind == "WordPiece":
            self.wordpiece_prefix = node.get("prefix", "##")

    @classmethod
    def of(cls, tok) -> "DecoderTraits":
        decoder = tok.decoder
        if decoder is None:
            return cls(None)
        try:
            return cls(json.loads(decoder.__getstate__()))
        except Exception:  # noqa: BLE001 - an unknown decoder just means "plain UTF-8 pieces"
            return cls(None)


def piece_to_bytes(piece: str, traits: DecoderTraits) -> bytes:
    if traits.byte_fallback or not traits.byte_level:
        m = _BYTE_FALLBACK_RE.match(piece)
        if m and traits.byte_fallback:
            return bytes([int(m.group(1), 16)])
    if traits.byte_level:
        table = unicode_to_byte()
        out = bytearray()
        for ch in piece:
            b = table.get(ch)
            if b is None:
                out += ch.encode("utf-8")
            else:
                out.append(b)
        return bytes(out)
    if traits.space_marker:
        piece = piece.replace(traits.space_marker, " ")
    elif traits.wordpiece_prefix and piece.startswith(traits.wordpiece_prefix):
        piece = piece[len(traits.wordpiece_prefix):]
    return piece.encode("utf-8")
