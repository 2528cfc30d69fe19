"""MobileNetV5 (Gemma 3n's vision tower) and Gemma 3n's multimodal embedder against
transformers' ``TimmWrapperModel`` over timm, and ``Gemma3nMultimodalEmbedder``."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

from mistralrs_core.loading.weights import load_module
from mistralrs_core.testing.parity import max_rel_err, perturb_parameters

from mistralrs_arch_vision.towers.mobilenetv5 import MobileNetV5Tower
from mistralrs_arch_vision.towers.multimodal_embedder import Gemma3nMultimodalEmbedder
from timm_reference import import_timm
from tiny_gemma3n_vision import reference_soft_tokens, reference_tower, tiny_vision_config

try:
    import_timm()
except ImportError:  # timm is a test-only dependency (the root pyproject's `test` extra)
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
    px = _pixels(1, 256, seed=7)
    want = reference_soft_tokens(ref, px)
    params = dict(ours.named_parameters())
    for name in ("conv_stem.conv.bias", "blocks.0.1.bn1.weight", "blocks.1.0.dw_start.conv.weight",
                 "blocks.2.2.attn.key.down_conv.weight", "blocks.3.1.attn.query.proj.weight",
                 "blocks.3.2.dw_end.bn.weight", "msfa.ffn.pw_proj.conv.weight"):
        p = params[name]
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
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


def _with_args(**args):
    vc = tiny_vision_config()
    vc["model_args"].update(args)
    return vc


@pytest.mark.parametrize("vc,field", [
    (dict(tiny_vision_config(), architecture="resnet50"), "architecture"),
    (dict(tiny_vision_config(), hidden_size=1024), "hidden_size"),
    (_with_args(features_only=True), "features_only"),
    (_with_args(depth_multiplier=2.0), "depth_multiplier"),
    (_with_args(msfa_indices=[-7]), "msfa index"),
    (_with_args(block_args=[["ir_r1_k3_s2_e4_c8"]]), "block type"),
    (_with_args(block_args=[["uir_r1_a0_k0_s2_e4_c8"]]), "depthwise"),
    (_with_args(block_args=[["er_r1_k3_s2_e4_c8_se0.25"]]), "squeeze-excite"),
])
def test_bad_configs_are_clear_errors(vc, field):
    with pytest.raises(ValueError, match=field):
        MobileNetV5Tower.from_hf(vc)


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
