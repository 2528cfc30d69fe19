"""MobileNetV5 (Gemma 3n's vision tower) and Gemma 3n's multimodal embedder against
transformers' ``TimmWrapperModel`` over timm, and ``Gemma3nMultimodalEmbedder``."""
import copy
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")

from mistralrs_core.loading.weights import load_module
from mistralrs_core.testing.parity import max_rel_err, perturb_parameters

from mistralrs_arch_vision.towers.mobilenetv5 import MobileNetV5Tower
from mistralrs_arch_vision.towers.multimodal_embedder import Gemma3nMultimodalEmbedder
from timm_reference import import_timm
from tiny_gemma3n_vision import reference_soft_tokens, reference_tower, tiny_vision_config

if importlib.util.find_spec("timm") is None:
    # A test-only dependency (the root pyproject's `test-timm` extra, installed by `make install`).
    # It is imported by the tests that need it, not at collection.
    pytest.skip("timm is not installed", allow_module_level=True)

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    """(reference TimmWrapperModel, our tower loaded from its state dict)."""
    vc = tiny_vision_config()
    ref = reference_tower(vc, seed=3)
    ours = MobileNetV5Tower.from_hf(vc)
    # transformers' names: ``timm_model.<timm name>`` under ``vision_tower.``
    load_module(ours, list(ref.state_dict().items()), map_name=ours.map_weight_name)
    return ref, ours


def _pixels(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_full_size_structure_equals_timm():
    # The released variant, built from its block strings, has timm's every parameter name
    # and shape (and nothing more): the checkpoint loads by name.
    timm = import_timm()
    with torch.device("meta"):
        ref = timm.create_model("mobilenetv5_300m_enc", pretrained=False, num_classes=0)
    ours = MobileNetV5Tower.from_hf({"architecture": "mobilenetv5_300m_enc", "hidden_size": 2048,
                                     "model_args": None})
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert (ours.num_tokens, ours.hidden_size) == (256, 2048)
    assert sorted(ours.msfa_taps) == sorted(ref.msfa_indices)
    # What shapes do not pin: strides, dilation, padding, skips, head split.
    convs = 0
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            mine_conv = ours.get_submodule(name)
            dynamic = type(m).__name__ == "Conv2dSame"
            assert (mine_conv.stride, mine_conv.dilation, mine_conv.groups, mine_conv.dynamic) == \
                (m.stride[0], m.dilation[0], m.groups, dynamic), name
            if not dynamic:
                assert mine_conv.padding == m.padding[0], name
            convs += 1
        elif hasattr(m, "has_skip"):
            assert ours.get_submodule(name).has_skip == m.has_skip, name
        elif type(m).__name__ == "MultiQueryAttention2d":
            mine_attn = ours.get_submodule(name)
            assert (mine_attn.num_heads, mine_attn.key_dim, mine_attn.value_dim) == \
                (m.num_heads, m.key_dim, m.value_dim), name
    assert convs > 200


@pytest.mark.parametrize("n,size", [(1, 768), (2, 186)])
def test_soft_tokens_equal_reference(pair, n, size):
    # 768: the processor's size (the MSFA average-pools 48 -> 16). 186: odd maps (93, 47), so
    # strided "same" convolutions pad asymmetrically, and a 12-wide MSFA map goes bilinear to 16.
    ref, ours = pair
    px = _pixels(n, size, seed=size + n)
    want = reference_soft_tokens(ref, px)
    with torch.inference_mode():
        got = ours(px)
    assert got.shape == (n, 256, 2048)
    assert max_rel_err(got, want) <= TOL
    if n == 2:  # images in one call are independent
        with torch.inference_mode():
            alone = ours(px[1:])
        assert max_rel_err(got[1:], alone) <= 1e-5


def test_parity_sees_every_block_kind(pair):
    # The comparison can fail: corrupting one parameter of each kind of block moves the output.
    ref, ours = pair
    px = _pixels(1, 96, seed=7)
    want = reference_soft_tokens(ref, px)
    params = dict(ours.named_parameters())
    g = torch.Generator().manual_seed(3)
    for name in ("conv_stem.conv.bias", "blocks.0.1.bn1.weight", "blocks.1.0.dw_start.conv.weight",
                 "blocks.2.2.attn.key.down_conv.weight", "blocks.3.1.attn.query.proj.weight",
                 "blocks.3.2.dw_end.bn.weight", "msfa.ffn.pw_proj.conv.weight"):
        p = params[name]
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            got = ours(px)
            p.copy_(saved)
        assert max_rel_err(got, want) > 10 * TOL, name


def test_bfloat16_tower_is_as_close_as_the_reference_in_bfloat16(pair):
    ref, ours = pair
    px = _pixels(1, 64, seed=11)
    want = reference_soft_tokens(ref, px)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    ours16 = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.inference_mode():
        got = ours16(px)
    assert got.dtype == torch.bfloat16
    ref_err = max_rel_err(reference_soft_tokens(ref16, px.to(torch.bfloat16)).float(), want)
    # our norms compute in float32 where timm's stay in bfloat16: no worse than the reference
    assert max_rel_err(got.float(), want) <= max(1.5 * ref_err, 1e-2)


def test_checkpoint_names():
    tower = MobileNetV5Tower.from_hf(tiny_vision_config())
    assert tower.map_weight_name("timm_model.blocks.2.2.attn.key.down_conv.weight") == \
        "blocks.2.2.attn.key.down_conv.weight"
    assert tower.map_weight_name("conv_stem.conv.weight") == "conv_stem.conv.weight"
    assert tower.keeps_weight("msfa.norm.weight")


def _top(**fields):
    return lambda: dict(tiny_vision_config(), **fields)


def _with_args(**args):
    def make():
        vc = tiny_vision_config()
        vc["model_args"].update(args)
        return vc
    return make


@pytest.mark.parametrize("make,field", [
    (_top(architecture="resnet50"), "architecture"),
    (_top(hidden_size=1024), "hidden_size"),
    (_with_args(features_only=True), "features_only"),
    (_with_args(depth_multiplier=2.0), "depth_multiplier"),
    (_with_args(msfa_indices=[-7]), "msfa index"),
    (_with_args(block_args=[["ir_r1_k3_s2_e4_c8"]]), "block type"),
    (_with_args(block_args=[["uir_r1_a0_k0_s2_e4_c8"]]), "depthwise"),
    (_with_args(block_args=[["er_r1_k3_s2_e4_c8_se0.25"]]), "squeeze-excite"),
])
def test_bad_configs_are_clear_errors(make, field):
    # (configs are built inside the test: building one imports timm, which collection must not)
    with pytest.raises(ValueError, match=field):
        MobileNetV5Tower.from_hf(make())


def test_bad_pixels(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="pixel_values"):
        ours(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="pixel_values"):
        ours(torch.rand(3, 64, 64))


def test_embedder_equals_reference():
    from transformers import Gemma3nTextConfig, Gemma3nVisionConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nMultimodalEmbedder as Ref
    import_timm()
    vc = {k: v for k, v in tiny_vision_config().items() if k not in ("model_type", "model_args")}
    ref = Ref(Gemma3nVisionConfig(**vc), Gemma3nTextConfig(hidden_size=64)).eval()
    perturb_parameters(ref, seed=5, scale=0.5)
    ours = Gemma3nMultimodalEmbedder.from_hf(vc, text_hidden=64)
    load_module(ours, list(ref.state_dict().items()))
    g = torch.Generator().manual_seed(0)
    soft = torch.randn(2, 256, 2048, generator=g)
    ids = torch.tensor([[262_144, 262_145, 262_159], [262_150, 262_144, 262_151]])
    with torch.inference_mode():
        # get_image_features scales by sqrt(hidden) before embed_vision
        want_soft = ref(inputs_embeds=soft * 2048 ** 0.5)
        want_ids = ref(input_ids=ids)
        got_soft = ours.embed_image_features(soft)
        got_ids = ours.embed_ids(ids)
    assert max_rel_err(got_soft, want_soft) <= TOL
    assert max_rel_err(got_ids, want_ids) <= TOL
    assert ours.owns(torch.tensor([262_143, 262_144, 262_159, 262_160])).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="token ids"):
        ours.embed_ids(torch.tensor([5]))


def test_tower_and_embedder_equal_gemma3n_get_image_features(tmp_path):
    # The whole image path of transformers' Gemma3nModel (tower, flatten, sqrt(hidden) scale,
    # embed_vision) against ours, with the weights and config read back from a saved checkpoint.
    import json

    from safetensors.torch import load_file
    from transformers import (Gemma3nAudioConfig, Gemma3nConfig, Gemma3nForConditionalGeneration,
                              Gemma3nTextConfig, Gemma3nVisionConfig)
    from tiny_gemma3n_vision import perturb_tower, restore_vision_model_args

    vc = {k: v for k, v in tiny_vision_config().items() if k != "model_type"}
    tc = Gemma3nTextConfig(vocab_size=300, vocab_size_per_layer_input=300, hidden_size=64,
                           hidden_size_per_layer_input=8, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_kv_shared_layers=0,
                           laurel_rank=4, activation_sparsity_pattern=[0.0, 0.0],
                           layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    ac = Gemma3nAudioConfig(hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1,
                            sscp_conv_channel_size=[8, 8], vocab_size=8)
    cfg = Gemma3nConfig(text_config=tc.to_dict(), vision_config=Gemma3nVisionConfig(**vc).to_dict(),
                        audio_config=ac.to_dict())
    ref = Gemma3nForConditionalGeneration(cfg).eval()
    restore_vision_model_args(ref.config)
    perturb_tower(ref.model.vision_tower, seed=9)
    perturb_parameters(ref.model.embed_vision, seed=10, scale=0.5)
    ref.save_pretrained(tmp_path, safe_serialization=True)

    saved = json.loads((tmp_path / "config.json").read_text())
    tower = MobileNetV5Tower.from_hf(saved["vision_config"])
    embed = Gemma3nMultimodalEmbedder.from_hf(saved["vision_config"], saved["text_config"]["hidden_size"])
    weights = {}
    for f in tmp_path.glob("*.safetensors"):
        weights.update(load_file(f))
    load_module(tower, [(k[len("model.vision_tower."):], v) for k, v in weights.items()
                        if k.startswith("model.vision_tower.")], map_name=tower.map_weight_name)
    load_module(embed, [(k[len("model.embed_vision."):], v) for k, v in weights.items()
                        if k.startswith("model.embed_vision.")])
    px = _pixels(2, 96, seed=13)
    with torch.inference_mode():
        want = ref.model.get_image_features(px, return_dict=True).pooler_output
        got = embed.embed_image_features(tower(px))
    assert got.shape == want.shape == (2, 256, 64)
    assert max_rel_err(got, want) <= TOL
