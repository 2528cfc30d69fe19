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
    # q/k/v were fused at load, and the checkpoint names still resolve to their rows.
    from mistralrs_core.loading.weights import read_weight
    assert ours.encoder.layers[0].self_attn._qkv_runtime is not None
    name = "encoder.layers.2.self_attn.k_proj.weight"
    assert torch.equal(read_weight(ours, name), ref.state_dict()[name])
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


def _stream(path, prefix, rename=None):
    """(name, tensor) pairs of a safetensors file under ``prefix``, prefix removed, as a
    family's ``map_weight_name`` would hand them on."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            if name.startswith(prefix):
                rest = name[len(prefix):]
                yield (rename(rest) if rename else rest), f.get_tensor(name)


@torch.inference_mode()
@pytest.mark.parametrize("released_names", [False, True])
def test_gemma3_image_features_end_to_end(tmp_path, released_names):
    """Processor -> tower -> projector equals transformers' Gemma 3 ``get_image_features`` on
    the same image, loading from the checkpoint file as a family would: transformers 5 saves
    ``vision_tower.embeddings...``, the released checkpoints ``vision_tower.vision_model....``."""
    from PIL import Image

    from mistralrs_arch_vision.processors.gemma3 import Gemma3ImageProcessor

    vision = dict(TINY, image_size=56, vision_use_head=False)
    text = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=12, vocab_size=300)
    config = transformers.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                                       boi_token_index=297, eoi_token_index=298, image_token_index=299)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(config).eval()
    perturb_parameters(ref, seed=5, scale=0.2)
    ref.save_pretrained(tmp_path)
    hf = config.to_dict()

    tower = SiglipVisionTower(SiglipTowerConfig.from_hf(hf["vision_config"]))
    assert tower.head is None
    rename = (lambda n: "vision_model." + n) if released_names else None
    load_module(tower, _stream(tmp_path / "model.safetensors", "vision_tower.", rename))
    projector = Gemma3MultiModalProjector.from_hf(hf)
    load_module(projector, _stream(tmp_path / "model.safetensors", "multi_modal_projector."))

    g = torch.Generator().manual_seed(6)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for h, w in ((90, 40), (56, 56), (30, 200))]
    proc_config = {"size": {"height": 56, "width": 56}, "pan_and_scan_min_crop_size": 20,
                   "pan_and_scan_max_num_crops": 3, "pan_and_scan_min_ratio_to_activate": 1.2}
    ours_px = Gemma3ImageProcessor.from_hf(proc_config)(images, do_pan_and_scan=True)
    ref_px = transformers.Gemma3ImageProcessorPil.from_dict(proc_config)(
        images, do_pan_and_scan=True, return_tensors="pt")
    assert ours_px.num_crops == ref_px["num_crops"].tolist() and sum(ours_px.num_crops) > 0
    want = ref.model.get_image_features(ref_px["pixel_values"]).pooler_output
    got = projector(tower(ours_px.pixel_values))
    assert got.shape == (len(images) + sum(ours_px.num_crops), 16, 24)
    assert max_rel_err(got, want) < 1e-5


@torch.inference_mode()
def test_bfloat16_tower_runs_in_its_dtype():
    # The loader casts to the tower's dtype; float32 pixels and the learned probe/positions
    # must follow it (a missed cast raises in F.linear / conv2d or silently upcasts).
    import copy
    cfg, ref = _reference(use_head=True)
    ours = SiglipVisionTower(SiglipTowerConfig.from_hf(cfg.to_dict()), dtype=torch.bfloat16)
    load_module(ours, ((n, t.detach().clone()) for n, t in ref.state_dict().items()))
    px = _pixels()
    got = ours(px)
    assert got.dtype == torch.bfloat16 and ours.pool(got).dtype == torch.bfloat16
    # No worse than transformers' own tower run in bfloat16 (both ~1.4e-2 from float32 here).
    exact = ref(pixel_values=px).last_hidden_state
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)(pixel_values=px.bfloat16()).last_hidden_state
    assert max_rel_err(got.float(), exact) <= 1.25 * max_rel_err(ref_bf16.float(), exact)
