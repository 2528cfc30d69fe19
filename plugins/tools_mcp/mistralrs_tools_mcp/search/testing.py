"""A tiny local embedding model for tests and examples of the reranker (no downloads).

``write_word_embedding_model(out, words)`` writes an EmbeddingGemma-family folder (Gemma 3
text body, config, word-level tokenizer) whose layers add nothing to the residual stream
(their output projections are zero): each token's vector is its own random embedding,
normalised, and mean pooling makes a text's vector the average of its words' vectors. So
cosine similarity measures shared words, and a passage that shares the query's words ranks
first, through the real loader, tokenizer, model and pooling of the embedding pipeline."""
from __future__ import annotations

import json
import re
from pathlib import Path


def write_word_embedding_model(out, words, *, hidden: int = 128, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in sorted({w.lower() for text in words for w in re.findall(r"\w+", text)}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "tokenizer_class": "PreTrainedTokenizerFast"}))
    heads, kv_heads, head_dim, inter = 2, 1, 16, 2 * hidden
    cfg = {"architectures": ["Gemma3TextModel"], "model_type": "gemma3_text", "vocab_size": len(vocab),
           "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": 1,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
           "query_pre_attn_scalar": head_dim, "sliding_window": 512, "layer_types": ["full_attention"],
           "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
           "use_bidirectional_attention": True, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
           "tie_word_embeddings": True, "torch_dtype": "float32",
           "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05
    embed = torch.randn(len(vocab), hidden, generator=g)
    # Unknown words (prompt words included) and padding weigh nothing: a zero vector stays
    # zero through the norms, so they only scale the mean, which cosine ignores.
    embed[:2] = 0
    p = "layers.0."
    tensors = {
        "embed_tokens.weight": embed,
        p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
        p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
        p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
        # Zero output projections: the layer leaves every token's vector as it is.
        p + "self_attn.o_proj.weight": torch.zeros(hidden, heads * head_dim),
        p + "mlp.gate_proj.weight": rand(inter, hidden),
        p + "mlp.up_proj.weight": rand(inter, hidden),
        p + "mlp.down_proj.weight": torch.zeros(hidden, inter),
        "norm.weight": torch.zeros(hidden),
    }
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        tensors[p + name + ".weight"] = torch.zeros(hidden)
    for name in ("q_norm", "k_norm"):
        tensors[p + "self_attn." + name + ".weight"] = torch.zeros(head_dim)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def register_tools_plugin() -> None:
    """Register this distribution's hooks in-process (tests run from a checkout whose entry
    point may not be installed). A checkout without the MCP provider's module gets only the
    search and code-execution registrations: the Runner loads every registered provider."""
    import importlib.util
    import types

    from mistralrs_core import plugins
    from mistralrs_core.hookspecs import hookimpl
    from mistralrs_tools_mcp import plugin

    if importlib.util.find_spec("mistralrs_tools_mcp.mcp_provider") is not None:
        plugins.register_plugin(plugin, "tools_mcp")
        return

    def providers(register):
        register("web_search", "mistralrs_tools_mcp.search_provider:SearchToolProvider")
        register("code_execution", "mistralrs_tools_mcp.code_provider:CodeExecutionToolProvider")

    def capabilities(register):
        register("web_search", provides="Runner(enable_search=True) and web_search_options")
        register("code_execution", provides="Runner(code_execution_config=...) and enable_code_execution")
    plugins.register_plugin(types.SimpleNamespace(
        mistralrs_register_tool_providers=hookimpl(providers),
        mistralrs_register_capabilities=hookimpl(capabilities)), "tools_mcp")
