"""A tiny MobileNetV5 (Gemma 3n's vision tower) that timm builds too, and its reference.

The hub config names the variant (``architecture: mobilenetv5_300m_enc``) and transformers'
``TimmWrapperModel`` passes ``model_args`` to ``timm.create_model``; timm's builder lets
``block_args`` replace the 300M block list, so a scaled-down block list (every block type:
edge residual, universal inverted residual with start/mid/end depthwise convs, multi-query
attention with key/value downsampling) is an ordinary config both sides read.

timm pops keys out of the block dicts while building: always hand it a fresh copy
(``tiny_model_args()`` returns one per call), and put a fresh copy back on the config before
saving it.
"""
from __future__ import annotations

import copy

import torch

from mistralrs_core.testing.parity import perturb_parameters
from timm_reference import import_timm

# Channels are multiples of 8 (timm rounds to 8). Four stages each opening with a stride of
# 2, as the real encoder: the MSFA fuses stages 2 and 3 (strides 16 and 32).
TINY_ARCH = [
    ["er_r1_k3_s2_e4_c8", "er_r1_k3_s1_e4_c8"],
    ["uir_r1_a3_k5_s2_e6_c16", "uir_r1_a5_k0_s1_e4_c16"],
    ["uir_r1_a5_k5_s2_e6_c24", "uir_r1_a0_k0_s1_e1_c24", "mqa_r1_k3_h2_v2_s1_d8_c24", "uir_r1_a0_k0_s1_e2_c24"],
    ["uir_r1_a5_k5_s2_e6_c32", "mqa_r1_k3_h3_s1_d8_c32", "uir_r1_a0_k3_p3_s1_e2_c32",
     "uir_r1_a3_k0_s1_e2_c32_noskip"],
]


def tiny_model_args() -> dict:
    """``model_args`` for the tiny variant, in the decoded form timm accepts (a new copy)."""
    import_timm()
    from timm.models._efficientnet_builder import decode_arch_def
    return {"block_args": decode_arch_def(copy.deepcopy(TINY_ARCH)), "stem_size": 8}


def tiny_vision_config() -> dict:
    """A Gemma 3n ``vision_config`` (as config.json holds it) for the tiny tower."""
    return {"architecture": "mobilenetv5_300m_enc", "model_type": "gemma3n_vision", "hidden_size": 2048,
            "vocab_size": 16, "vocab_offset": 262_144, "rms_norm_eps": 1e-6, "do_pooling": False,
            "model_args": tiny_model_args()}


def perturb_tower(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter moved off its init; layer scales (initialised at 1e-5, which would
    make every residual branch invisible) raised to O(0.3), and queries scaled up so that
    attention is far from uniform (else the key path would barely show in the output)."""
    perturb_parameters(module, seed=seed, scale=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layer_scale.gamma"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("attn.query.proj.weight"):
                p.mul_(4.0)


def reference_tower(vision_config: dict, seed: int = 0):
    """transformers' ``TimmWrapperModel`` for this vision_config, perturbed, in eval mode."""
    import_timm()
    from transformers import AutoModel, Gemma3nVisionConfig
    cfg = copy.deepcopy(vision_config)
    cfg.pop("model_type", None)
    torch.manual_seed(seed)         # the initial weights too: a test's numbers must not depend on test order
    model = AutoModel.from_config(Gemma3nVisionConfig(**cfg)).eval()
    model.config.model_args = copy.deepcopy(vision_config.get("model_args"))
    perturb_tower(model, seed)
    return model


@torch.inference_mode()
def reference_soft_tokens(model, pixels: torch.Tensor, tokens: int = 256) -> torch.Tensor:
    """What ``Gemma3nModel.get_image_features`` feeds ``embed_vision`` (before its
    sqrt(hidden) scaling): the last hidden state [B, C, h, w] as [B, h*w, C]."""
    last = model(pixel_values=pixels, do_pooling=False, return_dict=True).last_hidden_state
    return last.reshape(last.shape[0], model.config.hidden_size, tokens).permute(0, 2, 1)


def restore_vision_model_args(hf_config, model_args: dict | None = None) -> None:
    """Put clean ``model_args`` back on a built Gemma 3n config (or its vision config).

    timm rewrites the block dicts it is handed (pops ``block_type``, adds layer classes), so a
    model built from ``tiny_vision_config()`` holds a config that ``save_pretrained`` cannot
    write faithfully; call this before saving."""
    vision = getattr(hf_config, "vision_config", hf_config)
    vision.model_args = copy.deepcopy(model_args) if model_args is not None else tiny_model_args()
