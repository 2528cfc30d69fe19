"""Gemma 3n's audio side against transformers: our log-mel features equal
``Gemma3nAudioFeatureExtractor``'s, and our conformer encoder equals ``Gemma3nAudioEncoder``
(tiny config, every parameter perturbed, float32)."""
import numpy as np
import pytest
import torch

from mistralrs_core.loading.weights import load_module
from mistralrs_core.testing.parity import max_rel_err, perturb_parameters

from mistralrs_arch_vision.processors.gemma3n_audio import Gemma3nAudioFeatureExtractor
from mistralrs_arch_vision.towers.gemma3n_audio import Gemma3nAudioEncoder

transformers = pytest.importorskip("transformers")
from transformers.models.gemma3n import Gemma3nAudioConfig  # noqa: E402
from transformers.models.gemma3n.feature_extraction_gemma3n import (  # noqa: E402
    Gemma3nAudioFeatureExtractor as RefExtractor,
)
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder as RefEncoder  # noqa: E402

TINY = dict(input_feat_size=32, hidden_size=32, conf_num_attention_heads=4, conf_num_hidden_layers=2,
            conf_attention_chunk_size=4, conf_attention_context_left=5, conf_attention_context_right=2,
            conf_conv_kernel_size=3, conf_reduction_factor=2, sscp_conv_channel_size=[8, 4],
            conf_attention_logit_cap=5.0)


def clip(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize("seconds", [0.05, 0.4, 1.337, 31.0])
def test_features_equal_the_reference_extractor(seconds):
    cfg = dict(feature_size=32, per_bin_mean=list(np.linspace(-1, 1, 32)), per_bin_stddev=list(np.linspace(0.5, 2, 32)))
    ours = Gemma3nAudioFeatureExtractor.from_config(cfg)
    ref = RefExtractor(**cfg)
    wave = clip(seconds, 0)
    want = ref(wave, return_tensors="np")
    got = ours(wave, 16000)
    assert got.mel.shape == want["input_features"][0].shape
    np.testing.assert_allclose(got.mel, want["input_features"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.valid, want["input_features_mask"][0])
    # Defaults (the hub's settings): 128 bins, no standardisation.
    d = Gemma3nAudioFeatureExtractor()(wave, 16000)
    np.testing.assert_allclose(d.mel, RefExtractor()(wave, return_tensors="np")["input_features"][0],
                               rtol=1e-5, atol=1e-5)


def test_other_rates_are_resampled_and_bad_settings_refused():
    ours = Gemma3nAudioFeatureExtractor()
    at16 = ours(clip(0.5, 1), 16000)
    at44 = ours(clip(0.5, 1, rate=44100), 44100)
    assert at44.mel.shape == at16.mel.shape
    with pytest.raises(ValueError, match="too short"):
        ours(np.zeros(100, np.float32), 16000)
    with pytest.raises(ValueError, match="dither"):
        Gemma3nAudioFeatureExtractor.from_config({"dither": 0.1})


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    ref = RefEncoder(Gemma3nAudioConfig(**TINY)).eval()
    perturb_parameters(ref, seed=3, scale=0.3)
    ours = Gemma3nAudioEncoder.from_hf(ref.config.to_dict())
    load_module(ours, ref.state_dict().items())
    return ref, ours


@pytest.mark.parametrize("frames", [5, 37, 64])
def test_encoder_equals_the_reference(encoders, frames):
    ref, ours = encoders
    torch.manual_seed(frames)
    mel = torch.randn(1, frames, 32)
    invalid = torch.zeros(1, frames, dtype=torch.bool)
    with torch.inference_mode():
        want = ref(mel, invalid)
        got, valid = ours(mel, ~invalid)
    assert got.shape == want.last_hidden_state.shape
    assert max_rel_err(got, want.last_hidden_state) < 1e-4
    assert torch.equal(~valid, want.audio_mel_mask)
    assert got.shape[1] == Gemma3nAudioEncoder.output_frames(frames, ours.cfg)


def test_encoder_with_padded_frames_equals_the_reference(encoders):
    """A batch whose second clip is padded: the reference's masks, frame for frame."""
    ref, ours = encoders
    torch.manual_seed(5)
    mel = torch.randn(2, 48, 32)
    invalid = torch.zeros(2, 48, dtype=torch.bool)
    invalid[1, 30:] = True
    with torch.inference_mode():
        want = ref(mel, invalid)
        got, valid = ours(mel, ~invalid)
    assert max_rel_err(got, want.last_hidden_state) < 1e-4
    assert torch.equal(~valid, want.audio_mel_mask)


def test_clips_of_any_lengths_encode_as_alone(encoders):
    from mistralrs_arch_vision.towers.gemma3n_audio import encode_clips
    _, ours = encoders
    ext = Gemma3nAudioFeatureExtractor(feature_size=32)
    clips = [ext(clip(s, i), 16000) for i, s in enumerate((0.3, 0.5, 0.3))]
    with torch.inference_mode():
        together = encode_clips(ours, clips, "cpu", torch.float32)
        for c, (enc, valid) in zip(clips, together):
            (alone, ok), = encode_clips(ours, [c], "cpu", torch.float32)
            # (A batch of 2 may take another GEMM path: equal to rounding, not bit for bit.)
            assert max_rel_err(enc, alone) < 1e-5 and torch.equal(valid, ok)
    assert together[0][0].shape[0] == Gemma3nAudioEncoder.output_frames(len(clips[0].mel), ours.cfg)
