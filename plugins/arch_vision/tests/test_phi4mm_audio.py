"""Phi-4-multimodal audio: log-mel features vs transformers' ``Phi4MultimodalFeatureExtractor``
and the conformer encoder + projection vs transformers' ``Phi4MultimodalAudioEmbedding``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mistralrs_core.loading.weights import load_module
from mistralrs_arch_vision.audio import resample
from mistralrs_arch_vision.inputs import LoadedAudio
from mistralrs_arch_vision.processors.phi4mm_audio import (Phi4MMAudioFeatureExtractor, kaldi_mel_filters,
                                                           pad_clips)
from mistralrs_arch_vision.towers.phi4mm_audio import CHECKPOINT_PREFIX, Phi4MMAudioConfig, Phi4MMAudioEncoder
from tiny_phi4mm_audio import (original_config, reference_audio_embedding, reference_forward,
                               to_original_name)

pytest.importorskip("transformers")

RTOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def speechlike(n: int, rate: int, seed: int = 0) -> np.ndarray:
    """A few harmonics with a wandering pitch plus noise: spectra with structure, not flat."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 8)) * 0.2 + rng.standard_normal(n) * 0.01
    return wav.astype(np.float32)


# --------------------------------------------------------------------------- features
@pytest.fixture(scope="module")
def extractors():
    from transformers import Phi4MultimodalFeatureExtractor
    return Phi4MMAudioFeatureExtractor(), Phi4MultimodalFeatureExtractor()


def test_mel_bank_equals_transformers(extractors):
    ours, ref = extractors
    assert np.array_equal(kaldi_mel_filters(257, 80, 0.0, 7690.0, 16000).astype(np.float32),
                          ref.mel_filters.astype(np.float32))
    assert torch.equal(ours.mel_filters, torch.from_numpy(ref.mel_filters).float())


# 400 samples = exactly one 25 ms frame (the shortest clip), 559 = one frame plus a partial hop.
@pytest.mark.parametrize("n", [400, 559, 1234, 16000, 36017])
def test_features_16k(extractors, n):
    ours, ref = extractors
    wav = speechlike(n, 16000, seed=n)
    expect = ref(wav, sampling_rate=16000, return_tensors="pt")
    clip = ours.prepare(wav, 16000)
    assert clip.features.dtype == torch.float32
    assert clip.features.shape == expect["audio_input_features"][0].shape
    assert (clip.features - expect["audio_input_features"][0]).abs().max() <= 1e-5
    assert clip.num_tokens == int(expect["audio_embed_sizes"][0])


@pytest.mark.parametrize("rate,n", [(8000, 8000), (8000, 230), (44100, 50000), (22050, 3000)])
def test_features_other_rates_resample_to_16k(extractors, rate, n):
    """transformers refuses rates other than 16 kHz; ours resamples (soxr) and equals it on the
    resampled clip. 230 samples at 8 kHz become 460 at 16 kHz: one frame."""
    ours, ref = extractors
    wav = speechlike(n, rate, seed=rate)
    with pytest.raises(ValueError):
        ref(wav, sampling_rate=rate)
    wav16 = resample(wav, rate, 16000)
    expect = ref(wav16, sampling_rate=16000, return_tensors="pt")
    clip = ours.prepare_audio(LoadedAudio(wav, rate, b"h")).data
    assert clip.features.shape == expect["audio_input_features"][0].shape
    assert (clip.features - expect["audio_input_features"][0]).abs().max() <= 1e-5
    assert clip.num_tokens == int(expect["audio_embed_sizes"][0])


def test_batch_of_clips_equals_transformers_batch(extractors):
    """Per-clip features stacked with ``pad_clips`` give transformers' batched features on the
    real frames, its attention mask and its token counts."""
    ours, ref = extractors
    wavs = [speechlike(n, 16000, seed=n) for n in (16000, 559, 7777)]
    expect = ref(wavs, sampling_rate=16000, return_tensors="pt")
    clips = [ours.prepare(w, 16000) for w in wavs]
    feats, mask = pad_clips([c.features for c in clips])
    assert torch.equal(mask, expect["audio_attention_mask"])
    assert [c.num_tokens for c in clips] == expect["audio_embed_sizes"].tolist()
    for i, c in enumerate(clips):
        assert (feats[i, : c.num_frames] - expect["audio_input_features"][i, : c.num_frames]).abs().max() <= 1e-5


@pytest.mark.parametrize("samples,rate,match", [
    (np.zeros(0, np.float32), 16000, "too short"),
    (np.zeros(399, np.float32), 16000, "too short"),
    (np.zeros(150, np.float32), 8000, "too short"),
    (np.array([0.1, np.nan] * 400, np.float32), 16000, "NaN"),
    (np.zeros((800, 2), np.float32), 16000, "mono"),
    (np.array(["a"] * 800), 16000, "numbers"),
    (np.zeros(800, np.float32), 0, "sample rate"),
])
def test_bad_clips(samples, rate, match):
    with pytest.raises(ValueError, match=match):
        Phi4MMAudioFeatureExtractor().prepare_audio(LoadedAudio(samples, rate, b"h"))


def test_feature_config_from_hf():
    ex = Phi4MMAudioFeatureExtractor.from_hf({"feature_extractor": {"audio_compression_rate": 4,
                                                                    "feature_size": 80}})
    assert ex.cfg.audio_compression_rate == 4 and ex.num_tokens(9) == 3
    with pytest.raises(ValueError, match="win_length"):
        Phi4MMAudioFeatureExtractor.from_hf({"win_length": 1024, "n_fft": 512})


# --------------------------------------------------------------------------- encoder
def load_ours(ref_module, cfg, original: bool = False) -> Phi4MMAudioEncoder:
    sd = ref_module.state_dict()
    if original:
        enc = Phi4MMAudioEncoder.from_hf(original_config(cfg))
        weights = [(CHECKPOINT_PREFIX + to_original_name(k), v) for k, v in sd.items()]
        # The original checkpoint also holds the speech/vision LoRA tensors; they are skipped.
        weights.append((CHECKPOINT_PREFIX + "encoder.encoders.0.self_attn.linear_q.lora_A.speech.weight",
                        torch.zeros(1)))
    else:
        enc = Phi4MMAudioEncoder.from_hf(cfg.to_dict())
        weights = [(CHECKPOINT_PREFIX + k, v) for k, v in sd.items()]

    def name(n):
        assert n.startswith(CHECKPOINT_PREFIX)
        return Phi4MMAudioEncoder.map_weight_name(n[len(CHECKPOINT_PREFIX):])
    load_module(enc, weights, map_name=name)
    return enc.eval()


@pytest.fixture(scope="module")
def tiny():
    ref, cfg = reference_audio_embedding()
    return ref, cfg, load_ours(ref, cfg)


# 1 frame (shortest), 37, 203, and 4321 frames -> 541 subsampled: two 500-frame windows, the
# second mostly zero rows, with relative distances beyond bias_max_distance.
@pytest.mark.parametrize("frames,mode", [(1, "speech"), (37, "vision"), (203, "speech"), (4321, "vision")])
def test_encoder_one_clip(tiny, frames, mode):
    ref, cfg, ours = tiny
    x = torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(frames)) * 2 + 5
    expect = reference_forward(ref, x, None, mode)
    with torch.no_grad():
        got = ours(x, None, mode)
    assert got.shape == expect.shape == (1, -(-frames // 8), cfg.hidden_size)
    assert rel(got, expect) <= RTOL


def test_encoder_batch_equals_alone(tiny):
    """Clips of different lengths and modes in one call: each equals transformers' result for
    that clip alone and ours alone."""
    ref, cfg, ours = tiny
    g = torch.Generator().manual_seed(7)
    clips = [torch.randn(n, 80, generator=g) * 2 + 5 for n in (203, 37, 4321, 1)]
    modes = ["speech", "vision", "vision", "speech"]
    with torch.no_grad():
        batched = ours.encode(clips, modes)
        for c, m, got in zip(clips, modes, batched):
            expect = reference_forward(ref, c[None], None, m)[0]
            assert got.shape == expect.shape
            assert rel(got, expect) <= RTOL
            alone = ours.encode([c], m)[0]
            assert rel(got, alone) <= 1e-5
        feats, mask = pad_clips(clips)
        padded = ours(feats, mask, modes)
    for i, c in enumerate(clips):
        n = -(-c.shape[0] // 8)
        assert torch.equal(padded[i, :n], batched[i])
        assert not padded[i, n:].any()


def test_encoder_other_shapes():
    """The other settings: no chunking (chunk_size -1, Phi-4-multimodal's), symmetric bias,
    depthwise multiplier 2, kernel 5, time reduction 4, GELU feed-forward, SiLU subsampling."""
    ref, cfg = reference_audio_embedding(seed=3, chunk_size=-1, bias_symmetric=True, depthwise_multiplier=2,
                                         kernel_size=5, time_reduction=4, activation="gelu",
                                         nemo_activation="swish", bias_max_distance=600)
    ours = load_ours(ref, cfg)
    g = torch.Generator().manual_seed(3)
    clips = [torch.randn(n, 80, generator=g) for n in (90, 2003, 5)]
    with torch.no_grad():
        got = ours.encode(clips, "speech")
    for c, o in zip(clips, got):
        assert o.shape[0] == -(-c.shape[0] // 4)
        assert rel(o, reference_forward(ref, c[None])[0]) <= RTOL


def test_original_layout_loads_the_same(tiny):
    ref, cfg, ours = tiny
    theirs = load_ours(ref, cfg, original=True)
    assert theirs.cfg == ours.cfg
    x = torch.randn(2, 300, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(theirs(x, None, ["speech", "vision"]), ours(x, None, ["speech", "vision"]))


def test_features_through_encoder(tiny):
    """Real features: the extractor's token count is the encoder's output length."""
    _, _, ours = tiny
    ex = Phi4MMAudioFeatureExtractor()
    clips = [ex.prepare(speechlike(n, 16000, seed=n), 16000) for n in (400, 16000, 12345)]
    clips[1].mode = "vision"
    with torch.no_grad():
        out = ours.encode_clips(clips)
        alone = [ours.encode([c.features], c.mode)[0] for c in clips]
    assert [o.shape[0] for o in out] == [c.num_tokens for c in clips] == [1, 13, 10]
    for o, a in zip(out, alone):
        assert rel(o, a) <= 1e-5


def test_bad_encoder_inputs(tiny):
    _, _, ours = tiny
    x = torch.zeros(2, 10, 80)
    with pytest.raises(ValueError, match="80"):
        ours(torch.zeros(1, 10, 64))
    with pytest.raises(ValueError, match="empty"):
        ours(torch.zeros(1, 0, 80))
    with pytest.raises(ValueError, match="prefix"):
        ours(x, torch.tensor([[True] * 10, [False] + [True] * 9]))
    with pytest.raises(ValueError, match="no frames"):
        ours(x, torch.tensor([[True] * 10, [False] * 10]))
    with pytest.raises(ValueError, match="mode"):
        ours(x, None, "text")
    with pytest.raises(ValueError, match="modes"):
        ours(x, None, ["speech"])
    with pytest.raises(ValueError, match="clip 1"):
        ours.encode([torch.zeros(5, 80), torch.zeros(0, 80)])
    with pytest.raises(ValueError, match="tokens"):
        ours.encode([torch.zeros(16, 80)], "speech", [3])


def test_bad_configs(tiny):
    _, cfg, _ = tiny
    good = cfg.to_dict()
    for change, match in [({"downsample_rate": 2}, "downsample_rate"),
                          ({"ext_pw_out_channel": 8}, "ext_pw_out_channel"),
                          ({"time_reduction": 6}, "time_reduction"),
                          ({"num_attention_heads": 3}, "num_attention_heads"),
                          ({"activation": "mish"}, "activation")]:
        bad = {**good, "audio_config": {**good["audio_config"], **change}}
        with pytest.raises(ValueError, match=match):
            Phi4MMAudioConfig.from_hf(bad)
    with pytest.raises(ValueError, match="audio"):
        Phi4MMAudioConfig.from_hf({"hidden_size": 32})
    orig = original_config(cfg)
    orig["audio_processor"]["config"]["causal"] = False
    with pytest.raises(ValueError, match="causal"):
        Phi4MMAudioConfig.from_hf(orig)
