"""Dia and DAC against transformers (float32, tiny random models, every parameter perturbed):
encoder states, decoder logits for the first frame and each later frame, greedy codes
against ``generate``, the original checkpoint layouts, DAC decoding."""
from __future__ import annotations

import attrs
import pytest
import torch

from mistralrs_core.layers.attention_backends import CrossAttentionCache
from mistralrs_core.testing.parity import max_rel_err

from mistralrs_arch_speech.dia import DecodeStep
from mistralrs_arch_speech.engine import SpeechEngine
from mistralrs_arch_speech.kv_pool import DecoderKVPool
from mistralrs_arch_speech.loader import load_dac, load_dia
from mistralrs_arch_speech.pipeline import encode_text
from mistralrs_arch_speech.sampling import SpeechSampling

import tiny_dia
from tiny_dia import BOS, DELAY

COVERS = ["Dia"]
TOL = 1e-4
TEXT = "[S1] Hello there. [S2] Hi! How are you?"


@pytest.fixture(scope="module")
def dia(tmp_path_factory):
    ref = tiny_dia.make_reference_dia()
    path = tiny_dia.write_dia(ref, tmp_path_factory.mktemp("dia"))
    return ref, load_dia(path)


class OneRequest:
    """Drives our decoder for one request (rows 0 and 1: conditional, unconditional)."""

    def __init__(self, model, text_ids):
        cfg = model.cfg
        self.model = model
        ids = torch.tensor([text_ids, [0] * len(text_ids)])
        self.enc = model.encode(ids)
        self.pool = DecoderKVPool(cfg.decoder.layers, 2, cfg.decoder.kv_heads, cfg.decoder.head_dim,
                                  cfg.decoder.max_positions, model.dtype, "cpu", initial_frames=4)
        self.cross = [CrossAttentionCache(2) for _ in range(cfg.decoder.layers)]
        for layer, (k, v) in enumerate(model.cross_kv(self.enc)):
            for b in (0, 1):
                self.cross[layer].store(b, k[b], v[b])
        self.pos = 0
        self.n = len(text_ids)

    def step(self, frame: torch.Tensor) -> torch.Tensor:
        """frame [C] -> logits [2, C, V]."""
        self.pool.ensure(self.pos + 1)
        step = DecodeStep(self.pool, self.cross, torch.arange(2), torch.tensor([self.pos, self.pos]), [self.n] * 2)
        self.pos += 1
        return self.model.decode(frame[None].repeat(2, 1), step)


def test_text_bytes_match_the_reference_tokenizer():
    from transformers.models.dia.tokenization_dia import DiaTokenizer
    tok = DiaTokenizer()
    for text in (TEXT, "[S2]é ü 😀 [S1][S1]x", "plain"):
        assert encode_text(text) == tok(text, add_special_tokens=False)["input_ids"]


def test_encoder_and_decoder_logits_match_transformers(dia):
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    ref, ours = dia
    ids = encode_text(TEXT)
    inp = torch.tensor([ids, [0] * len(ids)])
    with torch.no_grad():
        ref_enc = ref.model.encoder(input_ids=inp).last_hidden_state
    run = OneRequest(ours, ids)
    assert max_rel_err(run.enc, ref_enc) <= TOL

    g = torch.Generator().manual_seed(3)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    frame = torch.full((len(DELAY),), BOS)
    errs = []
    for t in range(8):
        with torch.no_grad():
            out = ref(encoder_outputs=(ref_enc,), attention_mask=torch.ones_like(inp),
                      decoder_input_ids=frame[None, None].repeat(2, 1, 1), cache=cache, use_cache=True)
        cache = out.cache
        ref_logits = out.logits.view(2, len(DELAY), -1)          # [2 * C, 1, V] -> [2, C, V]
        errs.append(max_rel_err(run.step(frame), ref_logits))
        frame = torch.randint(0, 16, (len(DELAY),), generator=g)
    assert max(errs) <= TOL, errs


def _greedy_codes_ours(model, text: str, max_frames: int):
    engine = SpeechEngine(model, max_seqs=2, seed=0)
    try:
        s = SpeechSampling(cfg_scale=3.0, temperature=1.0, top_p=None, top_k=6, greedy=True, max_frames=max_frames)
        return engine.generate(encode_text(text), s)
    finally:
        engine.shutdown()


def test_greedy_codes_equal_transformers_generate(dia):
    ref, ours = dia
    max_frames = 40
    ids = torch.tensor([encode_text(TEXT)])
    dec_ids, dec_mask = tiny_dia.delayed_start()
    with torch.no_grad():
        seq = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec_ids,
                           decoder_attention_mask=dec_mask, do_sample=False, guidance_scale=3.0, top_k=6,
                           temperature=1.0, max_length=max_frames)
    ref_codes = tiny_dia.reference_codes(seq)[0]
    codes, truncated = _greedy_codes_ours(ours, TEXT, max_frames)
    assert ref_codes.shape[1] >= 32
    assert codes.shape == ref_codes.shape
    assert torch.equal(codes, ref_codes)
    assert truncated == (seq.shape[1] == max_frames + max(DELAY))


def test_greedy_codes_equal_transformers_when_speech_ends_by_itself(tmp_path):
    # A larger EOS row for codebook 0 makes this model end its speech after ~28 frames.
    ref = tiny_dia.make_reference_dia()
    with torch.no_grad():
        ref.logits_dense.weight[tiny_dia.EOS] *= 1.5
    ours = load_dia(tiny_dia.write_dia(ref, tmp_path / "dia"))
    ids = torch.tensor([encode_text(TEXT)])
    dec_ids, dec_mask = tiny_dia.delayed_start()
    with torch.no_grad():
        seq = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec_ids,
                           decoder_attention_mask=dec_mask, do_sample=False, guidance_scale=3.0, top_k=6,
                           temperature=1.0, max_length=60)
    assert seq.shape[1] < 60                                    # ended before the maximum
    codes, truncated = _greedy_codes_ours(ours, TEXT, 60)
    assert not truncated
    assert torch.equal(codes, tiny_dia.reference_codes(seq)[0])


def test_original_layout_loads_to_the_same_model(tmp_path):
    ref = tiny_dia.make_reference_dia(seed=5, enc_theta=7000.0)
    a = load_dia(tiny_dia.write_dia(ref, tmp_path / "hf"))
    b = load_dia(tiny_dia.write_dia_original(ref, tmp_path / "orig"))
    assert b.cfg.layout == "original"
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        assert torch.equal(pa, pb), na
    assert torch.allclose(a.cfg.encoder.inv_freq, b.cfg.encoder.inv_freq)
    assert torch.allclose(a.cfg.decoder.inv_freq, b.cfg.decoder.inv_freq)
    # And it generates what transformers generates from the same weights.
    ids = torch.tensor([encode_text(TEXT)])
    dec_ids, dec_mask = tiny_dia.delayed_start()
    with torch.no_grad():
        seq = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec_ids,
                           decoder_attention_mask=dec_mask, do_sample=False, guidance_scale=3.0, top_k=6,
                           temperature=1.0, max_length=36)
    codes, _ = _greedy_codes_ours(b, TEXT, 36)
    assert torch.equal(codes, tiny_dia.reference_codes(seq)[0])


@pytest.mark.parametrize("layout", ["transformers", "original"])
def test_dac_decode_equals_transformers(tmp_path, layout):
    ref = tiny_dia.make_reference_dac()
    write = tiny_dia.write_dac if layout == "transformers" else tiny_dia.write_dac_original
    codec = load_dac(write(ref, tmp_path / layout))
    assert codec.cfg.sampling_rate == 24000 and codec.cfg.hop_length == 16
    codes = torch.randint(0, 16, (2, len(DELAY), 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.decode(audio_codes=codes).audio_values
    got = codec.decode(codes)
    assert got.shape == want.shape == (2, 11 * 16)
    assert max_rel_err(got, want) <= TOL


def test_sampling_defaults_come_from_generation_config():
    s = SpeechSampling.from_generation_config(tiny_dia.GEN_CONFIG, 150)
    assert (s.cfg_scale, s.temperature, s.top_p, s.top_k, s.greedy, s.max_frames) == (3.0, 1.3, 0.95, 6, False, 60)
    d = SpeechSampling.from_generation_config({}, 3057)
    assert (d.cfg_scale, d.temperature, d.top_p, d.top_k, d.max_frames) == (3.0, 1.3, 0.95, 35, 3057)
    assert attrs.evolve(d, greedy=True).greedy
