"""Dia's hyperparameters from either checkpoint layout's config.json.

* transformers 5 (``DiaForConditionalGeneration``): ``encoder_config`` / ``decoder_config``
  sub-configs, token ids on the decoder config, ``delay_pattern`` at the top.
* the original ``nari-labs/Dia-1.6B`` release: ``{"model": {"encoder", "decoder", ...},
  "data": {"channels", "audio_*_value", "delay_pattern", ...}}`` with rope given as
  min/max timescales.
"""
from __future__ import annotations

import attrs
import torch

from mistralrs_core.layers.rope import RopeConfig, compute_inv_freq


@attrs.define
class StackConfig:
    """One transformer stack (encoder or decoder self-attention side)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
    norm_eps: float
    inv_freq: torch.Tensor            # rope frequencies, float32 [head_dim / 2]
    act: str = "silu"


@attrs.define
class DiaConfig:
    encoder: StackConfig
    decoder: StackConfig
    cross_heads: int
    cross_kv_heads: int
    cross_head_dim: int
    text_vocab: int                   # byte vocabulary of the encoder (256)
    audio_vocab: int                  # per-codebook vocabulary incl. eos/pad/bos (1028)
    channels: int                     # codebooks (9)
    eos_id: int
    pad_id: int
    bos_id: int
    delay_pattern: list[int]
    layout: str                       # "transformers" or "original"

    @property
    def max_delay(self) -> int:
        return max(self.delay_pattern)

    @classmethod
    def from_hf(cls, hf: dict) -> "DiaConfig":
        if isinstance(hf.get("model"), dict) and "encoder" in hf["model"]:
            return cls._from_original(hf)
        if "encoder_config" in hf and "decoder_config" in hf:
            return cls._from_transformers(hf)
        raise ValueError("config.json: not a Dia config (expected encoder_config/decoder_config, "
                         "or the original release's model/data sections)")

    @classmethod
    def _from_transformers(cls, hf: dict) -> "DiaConfig":
        enc, dec = hf["encoder_config"], hf["decoder_config"]

        def stack(c: dict, max_pos_default: int) -> StackConfig:
            heads = int(c.get("num_attention_heads", 16))
            head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
            rope = RopeConfig.from_hf(c, head_dim)
            if rope.rope_type != "default":
                raise ValueError(f"config.json: Dia rope_type {rope.rope_type!r} is not supported (default only)")
            return StackConfig(
                layers=int(c.get("num_hidden_layers", 12)), hidden=int(c["hidden_size"]),
                intermediate=int(c["intermediate_size"]), heads=heads,
                kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=head_dim,
                max_positions=int(c.get("max_position_embeddings", max_pos_default)),
                norm_eps=float(c.get("norm_eps", 1e-5)), inv_freq=compute_inv_freq(rope)[0],
                act=c.get("hidden_act", "silu"))

        delay = list(hf.get("delay_pattern") or [0, 8, 9, 10, 11, 12, 13, 14, 15])
        channels = int(dec.get("num_channels", len(delay)))
        if channels != len(delay):
            raise ValueError(f"config.json: delay_pattern has {len(delay)} entries for {channels} channels")
        return cls(
            encoder=stack(enc, 1024), decoder=stack(dec, 3072),
            cross_heads=int(dec.get("cross_num_attention_heads", 16)),
            cross_kv_heads=int(dec.get("cross_num_key_value_heads", 16)),
            cross_head_dim=int(dec.get("cross_head_dim", 128)),
            text_vocab=int(enc.get("vocab_size", 256)), audio_vocab=int(dec.get("vocab_size", 1028)),
            channels=channels,
            # Older exports keep the ids at the top level (transformers forwards them).
            eos_id=int(_first(dec, hf, "eos_token_id", 1024)), pad_id=int(_first(dec, hf, "pad_token_id", 1025)),
            bos_id=int(_first(dec, hf, "bos_token_id", 1026)), delay_pattern=delay, layout="transformers")

    @classmethod
    def _from_original(cls, hf: dict) -> "DiaConfig":
        m, data = hf["model"], hf.get("data") or {}
        enc, dec = m["encoder"], m["decoder"]
        eps = float(m.get("normalization_layer_epsilon", 1e-5))
        lo, hi = float(m.get("rope_min_timescale", 1)), float(m.get("rope_max_timescale", 10000))

        def inv_freq(head_dim: int) -> torch.Tensor:
            # timescale_i = lo * (hi / lo) ** (2i / d); the angle is position / timescale.
            frac = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
            return 1.0 / (lo * (hi / lo) ** frac)

        encoder = StackConfig(layers=int(enc["n_layer"]), hidden=int(enc["n_embd"]),
                              intermediate=int(enc["n_hidden"]), heads=int(enc["n_head"]),
                              kv_heads=int(enc["n_head"]), head_dim=int(enc["head_dim"]),
                              max_positions=int(data.get("text_length", 1024)), norm_eps=eps,
                              inv_freq=inv_freq(int(enc["head_dim"])))
        decoder = StackConfig(layers=int(dec["n_layer"]), hidden=int(dec["n_embd"]),
                              intermediate=int(dec["n_hidden"]), heads=int(dec["gqa_query_heads"]),
                              kv_heads=int(dec["kv_heads"]), head_dim=int(dec["gqa_head_dim"]),
                              max_positions=int(data.get("audio_length", 3072)), norm_eps=eps,
                              inv_freq=inv_freq(int(dec["gqa_head_dim"])))
        delay = list(data.get("delay_pattern") or [0, 8, 9, 10, 11, 12, 13, 14, 15])
        channels = int(data.get("channels", len(delay)))
        if channels != len(delay):
            raise ValueError(f"config.json: delay_pattern has {len(delay)} entries for {channels} channels")
        return cls(encoder=encoder, decoder=decoder, cross_heads=int(dec["cross_query_heads"]),
                   cross_kv_heads=int(dec["cross_query_heads"]), cross_head_dim=int(dec["cross_head_dim"]),
                   text_vocab=int(m.get("src_vocab_size", 256)), audio_vocab=int(m.get("tgt_vocab_size", 1028)),
                   channels=channels, eos_id=int(data.get("audio_eos_value", 1024)),
                   pad_id=int(data.get("audio_pad_value", 1025)), bos_id=int(data.get("audio_bos_value", 1026)),
                   delay_pattern=delay, layout="original")


def _first(a: dict, b: dict, key: str, default):
    for d in (a, b):
        if d.get(key) is not None:
            v = d[key]
            return v[0] if isinstance(v, list) else v
    return default
