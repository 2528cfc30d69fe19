"""A tiny Phi-4-multimodal audio embedding (transformers' modeling, every parameter and buffer
perturbed) and its weights/config in Microsoft's original layout, for the audio tests (and the
family's tiny model)."""
from __future__ import annotations

import re

import torch

from mistralrs_core.testing.parity import perturb_parameters

# Small widths; chunk_size > 0 so the chunk "mask" (a +1 bias in the reference) varies, and
# bias_max_distance below the longest test clip's subsampled length so the distance clips.
TINY_AUDIO = dict(hidden_size=16, intermediate_size=24, num_blocks=2, num_attention_heads=2,
                  chunk_size=4, left_chunk=2, ext_pw_out_channel=16, depthwise_separable_out_channel=16,
                  kernel_size=3, input_size=80, time_reduction=8, bias_max_distance=20,
                  nemo_conv_channels=8, activation="swish", conv_activation="swish",
                  conv_glu_type="swish", nemo_activation="relu")
TEXT_HIDDEN = 32


def reference_config(**audio_overrides):
    from transformers import Phi4MultimodalConfig
    cfg = Phi4MultimodalConfig(
        hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=200_100, audio_config={**TINY_AUDIO, **audio_overrides},
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    cfg._attn_implementation = "eager"
    cfg.audio_config._attn_implementation = "eager"
    return cfg


def reference_audio_embedding(seed: int = 0, **audio_overrides):
    """(transformers ``Phi4MultimodalAudioEmbedding`` in eval mode, its config)."""
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioEmbedding
    cfg = reference_config(**audio_overrides)
    torch.manual_seed(seed)
    module = Phi4MultimodalAudioEmbedding(cfg).eval()
    perturb_parameters(module, seed=seed, scale=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # global_mean / global_invstd are buffers (zeros / ones at init).
        for _, buf in module.named_buffers():
            buf.add_(torch.randn(buf.shape, generator=g) * 0.1)
    return module, cfg


def reference_forward(module, features, mask=None, mode: str = "speech") -> torch.Tensor:
    """What ``Phi4MultimodalAudioEmbedding.forward`` computes before scattering into the text
    embeddings: encoder -> up_proj -> GELU -> down_proj of the chosen mode."""
    if mode == "speech":
        up, down = module.up_proj_for_speech, module.down_proj_for_speech
    else:
        up, down = module.up_proj_for_vision_speech, module.down_proj_for_vision_speech
    with torch.no_grad():
        return down(torch.nn.functional.gelu(up(module.encoder(features, mask))))


# transformers' names -> Microsoft's, the inverse of transformers' conversion script.
_TO_ORIGINAL = [
    (r"^encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.gate_up_proj\.", r"encoder.encoders.\1.feed_forward_\2.net.0.linear."),
    (r"^encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.down_proj\.", r"encoder.encoders.\1.feed_forward_\2.net.2."),
    (r"^encoder\.encoders\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"encoder.encoders.\1.self_attn.linear_\2."),
    (r"^encoder\.encoders\.(\d+)\.self_attn\.o_proj\.", r"encoder.encoders.\1.self_attn.linear_out."),
    (r"^up_proj_for_speech\.", "audio_projection.speech.0."),
    (r"^down_proj_for_speech\.", "audio_projection.speech.2."),
    (r"^up_proj_for_vision_speech\.", "audio_projection.vision.0."),
    (r"^down_proj_for_vision_speech\.", "audio_projection.vision.2."),
]


def to_original_name(name: str) -> str:
    for pattern, repl in _TO_ORIGINAL:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def original_config(cfg) -> dict:
    """The reference config as Microsoft's config.json spells it (``audio_processor`` +
    ``embd_layer``)."""
    a = cfg.audio_config
    return {
        "hidden_size": cfg.hidden_size,
        "audio_processor": {"name": "cascades", "config": {
            "activation": a.activation, "activation_checkpointing": "", "attention_dim": a.hidden_size,
            "attention_heads": a.num_attention_heads, "batch_norm": False, "bias_in_glu": True, "causal": True,
            "chunk_size": a.chunk_size, "cnn_layer_norm": True, "conv_activation": a.conv_activation,
            "conv_glu_type": a.conv_glu_type, "depthwise_multiplier": a.depthwise_multiplier,
            "depthwise_seperable_out_channel": a.depthwise_separable_out_channel, "dropout_rate": 0.0,
            "encoder_embedding_config": {"input_size": a.input_size}, "ext_pw_kernel_size": 1,
            "ext_pw_out_channel": a.ext_pw_out_channel, "input_layer": "nemo_conv", "input_size": a.input_size,
            "kernel_size": a.kernel_size, "left_chunk": a.left_chunk, "linear_units": a.intermediate_size,
            "nemo_conv_settings": {"conv_channels": a.nemo_conv_channels, "activation": a.nemo_activation},
            "num_blocks": a.num_blocks,
            "relative_attention_bias_args": {"t5_bias_max_distance": a.bias_max_distance,
                                             "t5_bias_symmetric": a.bias_symmetric, "type": "t5"},
            "time_reduction": a.time_reduction}},
        "embd_layer": {"audio_embd_layer": {"compression_rate": 8, "downsample_rate": a.downsample_rate,
                                            "embedding_cls": "audio", "projection_cls": "mlp"}},
    }
