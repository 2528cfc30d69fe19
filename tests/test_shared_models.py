"""The shared model blocks live in core: any family plugin builds on them without arch_text."""
from __future__ import annotations

import json
import subprocess
import sys

import attrs

from mistralrs_core.layers.mlp import GatedMLP
from mistralrs_core.layers.moe import MoEConfig, SparseMoE
from mistralrs_core.models.decoder import DecoderConfig, DecoderLM
from mistralrs_core.models.moe_decoder import MoEDecoderConfig, MoEDecoderLayer, with_moe
from mistralrs_core.models.text_config import base_config

HF = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
      "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0}


def test_base_config_reads_the_llama_fields_and_takes_overrides():
    cfg = base_config(HF)
    assert isinstance(cfg, DecoderConfig)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (64, 32, 48, 3)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 8)
    assert (cfg.max_position_embeddings, cfg.norm_eps, cfg.hidden_act) == (4096, 1e-6, "silu")
    assert cfg.tie_word_embeddings is False and cfg.rope is not None
    no_kv = {k: v for k, v in HF.items() if k != "num_key_value_heads"}
    assert base_config(no_kv).num_kv_heads == 4
    assert base_config({**HF, "head_dim": 16}).head_dim == 16
    over = base_config(HF, qkv_bias=True, sliding_window=7, head_dim=4)
    assert (over.qkv_bias, over.sliding_window, over.head_dim) == (True, 7, 4)


def test_moe_decoder_builds_sparse_layers_where_configured():
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=16)
    cfg = with_moe(base_config(HF), moe, moe_layers=[False, True, True])
    assert isinstance(cfg, MoEDecoderConfig) and cfg.num_heads == 4
    assert [cfg.is_moe(i) for i in range(3)] == [False, True, True]

    class TinyMoE(DecoderLM):
        layer_cls = MoEDecoderLayer

    model = TinyMoE(cfg)
    mlps = [layer.mlp for layer in model.model.layers]
    assert isinstance(mlps[0], GatedMLP) and not isinstance(mlps[0], SparseMoE)
    assert all(isinstance(m, SparseMoE) for m in mlps[1:])
    # moe_layers None: every layer sparse; no MoEConfig: none.
    assert all(with_moe(base_config(HF), moe).is_moe(i) for i in range(3))
    assert not MoEDecoderConfig(**attrs.asdict(base_config(HF), recurse=False)).is_moe(0)


def test_core_models_import_without_any_plugin():
    """A vision plugin must be able to use these with arch_text absent."""
    code = ("import sys, json\n"
            "import mistralrs_core.models.text_config, mistralrs_core.models.moe_decoder\n"
            "import mistralrs_core.layers.attention_backends\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mistralrs_arch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_arch_text_uses_the_core_blocks_and_keeps_no_copies():
    import mistralrs_arch_text.deepseek_v2 as deepseek_v2
    import mistralrs_arch_text.llama as llama
    import mistralrs_arch_text.mixtral as mixtral
    assert not hasattr(llama, "base_config") or llama.base_config is base_config
    assert mixtral.MixtralForCausalLM.layer_cls is MoEDecoderLayer
    assert issubclass(deepseek_v2.MLAConfig, MoEDecoderConfig)
    for name in ("MoEDecoderConfig", "MoEDecoderLayer", "with_moe"):
        obj = getattr(mixtral, name, None)
        assert obj is None or obj.__module__ == "mistralrs_core.models.moe_decoder"
    cfg = llama.LlamaForCausalLM.config_from_hf(HF)
    assert cfg == base_config(HF, qkv_bias=False, o_bias=False, mlp_bias=False)
