"""The SigLIP tower and Gemma 3's projector against transformers, on tiny random configs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mistralrs_arch_vision.towers.siglip import (Gemma3MultiModalProjector, SiglipTowerConfig,
                                                  SiglipVisionTower)
from mistralrs_core.loading.weights import load_module
from mistralrs_core.testing.parity import max_rel_err, perturb_parameters

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_channels=3, image_size=28, patch_size=7, layer_norm_eps=1e-6,
            hidden_act="gelu_pytorch_tanh")


def _reference(use_head: bool):
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(**TINY, vision_use_head=use_head)
    ref = transformers.SiglipVisionModel(cfg).eval()
    perturb_parameters(ref, seed=1, scale=0.2)
    return cfg, ref


def _ours(cfg, ref, **kwargs):
    ours = SiglipVisionTower(SiglipTowerConfig.from_hf(cfg.to_dict()), **kwargs)
    load_module(ours, ((n, t.detach().clone()) for n, t in ref.state_dict().items()))
    return ours.eval()


def _pixels(n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, TINY["image_size"], TINY["image_size"], generator=g)


@torch.inference_mode()
def test_last_hidden_state_and_pooled_match_transformers():
    cfg, ref = _reference(use_head=True)
    ours = _ours(cfg, ref)
    px = _pixels()
    want = ref(pixel_values=px)
    got = ours(px)
    assert got.shape == (3, (28 // 7) ** 2, 32)
    assert max_rel_err(got, want.last_hidden_state) < 1e-5
    assert max_rel_err(ours.pool(got), want.pooler_output) < 1e-5
    # Batched equals one image at a time (no cross-image attention).
    alone = torch.cat([ours(px[i:i + 1]) for i in range(3)])
    assert max_rel_err(got, alone) < 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("feature_layer", [0, 1, -2, -1])
def test_intermediate_feature_layer_matches_hidden_states(feature_layer):
    cfg, ref = _reference(use_head=False)
    ours = _ours(cfg, ref)
    px = _pixels()
    want = ref(pixel_values=px, output_hidden_states=True).hidden_states[feature_layer]
    assert max_rel_err(ours(px, feature_layer=feature_layer), want) < 1e-5


@torch.inference_mode()
def test_truncated_tower_drops_unused_layers_and_head():
    cfg, ref = _reference(use_head=True)
    # Two layers are enough for hidden_states[-2] of a 3-layer tower; the third layer's
    # and the head's weights are in the checkpoint and must be dropped, not rejected.
    ours = _ours(cfg, ref, num_layers=2, use_head=False)
    assert len(ours.encoder.layers) == 2 and ours.head is None
    px = _pixels()
    want = ref(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    assert max_rel_err(ours(px, feature_layer=-2), want) < 1e-5
    with pytest.raises(ValueError):
        ours(px)


def test_config_reads_defaults_and_vision_model_prefix():
    cfg = SiglipTowerConfig.from_hf({"model_type": "siglip_vision_model", "hidden_size": 1152,
                                     "image_size": 896, "patch_size": 14, "vision_use_head": False})
    assert (cfg.num_hidden_layers, cfg.layer_norm_eps, cfg.patches_per_side) == (12, 1e-6, 64)
    tower = SiglipVisionTower(SiglipTowerConfig(**TINY, vision_use_head=False))
    assert tower.map_weight_name("vision_model.post_layernorm.weight") == "post_layernorm.weight"
    assert tower.map_weight_name("text_model.embeddings.token_embedding.weight") is None
    assert tower.map_weight_name("vision_model.head.probe") is None
    with pytest.raises(ValueError):
        tower(torch.zeros(1, 3, 14, 14))


@torch.inference_mode()
def test_gemma3_projector_matches_transformers():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector as RefProjector
    vision = dict(TINY, image_size=56, vision_use_head=False)  # an 8x8 patch grid
    text = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=12, vocab_size=64)
    config = transformers.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4)
    torch.manual_seed(0)
    ref = RefProjector(config).eval()
    perturb_parameters(ref, seed=3, scale=0.2)
    ours = Gemma3MultiModalProjector.from_hf(config.to_dict())
    load_module(ours, ((n, t.detach().clone()) for n, t in ref.state_dict().items()))
    g = torch.Generator().manual_seed(4)
    patches = torch.randn(3, 64, 32, generator=g)
    got = ours(patches)
    assert got.shape == (3, 4, 24)
    assert max_rel_err(got, ref(patches)) < 1e-5
