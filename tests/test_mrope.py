"""M-RoPE cos/sin (``MultiAxisRotaryEmbedding``) against transformers' text rotary modules:
Qwen2-VL's contiguous sections and Qwen3-VL's interleaved layout, on positions whose three
axes differ (an image's grid) and on 1-D text positions."""
import pytest
import torch

from mistralrs_core.layers.rope import MultiAxisRotaryEmbedding, RopeConfig

transformers = pytest.importorskip("transformers")

HEAD_DIM = 32


def positions(n=40):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 300, (3, n), generator=g)


def reference_cos_sin(module, pos):
    x = torch.zeros(1, pos.shape[1], HEAD_DIM)
    cos, sin = module(x, pos[:, None, :])
    return cos[0], sin[0]


@pytest.mark.parametrize("sections", [[6, 5, 5], [8, 4, 4], [4, 6, 6]])
def test_interleaved_matches_qwen3_vl(sections):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    cfg = Qwen3VLTextConfig(hidden_size=64, num_attention_heads=2, head_dim=HEAD_DIM,
                            rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                             "mrope_section": sections, "mrope_interleaved": True})
    ref = Qwen3VLTextRotaryEmbedding(cfg)
    ours = MultiAxisRotaryEmbedding(RopeConfig(head_dim=HEAD_DIM, theta=5000.0), sections, interleaved=True)
    pos = positions()
    cos, sin = ours.cos_sin(pos, torch.float32)
    want_cos, want_sin = reference_cos_sin(ref, pos)
    assert torch.allclose(cos, want_cos, atol=1e-6) and torch.allclose(sin, want_sin, atol=1e-6)
    # the layouts differ: the contiguous one would not pass
    plain = MultiAxisRotaryEmbedding(RopeConfig(head_dim=HEAD_DIM, theta=5000.0), sections)
    assert not torch.allclose(plain.cos_sin(pos, torch.float32)[0], want_cos, atol=1e-3)
    # text positions (1-D, or equal axes) are plain rope either way
    text = pos[0]
    assert torch.equal(ours.cos_sin(text, torch.float32)[0], plain.cos_sin(text, torch.float32)[0])
    assert torch.allclose(ours.cos_sin(text.expand(3, -1), torch.float32)[0],
                          ours.cos_sin(text, torch.float32)[0])


def test_contiguous_matches_qwen2_vl():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    sections = [6, 5, 5]
    cfg = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections})
    ref = Qwen2VLRotaryEmbedding(cfg)
    ours = MultiAxisRotaryEmbedding(RopeConfig(head_dim=HEAD_DIM, theta=10000.0), sections)
    pos = positions()
    cos, sin = ours.cos_sin(pos, torch.float32)
    want_cos, want_sin = reference_cos_sin(ref, pos)
    assert torch.allclose(cos, want_cos, atol=1e-6) and torch.allclose(sin, want_sin, atol=1e-6)


def test_bad_sections_refused():
    cfg = RopeConfig(head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="must sum"):
        MultiAxisRotaryEmbedding(cfg, [6, 5, 4], interleaved=True)
    with pytest.raises(ValueError, match="3 axes"):
        MultiAxisRotaryEmbedding(cfg, [8, 8], interleaved=True)
