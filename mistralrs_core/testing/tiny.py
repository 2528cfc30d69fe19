"""Tiny model directories built locally (no downloads) for tests, demos and benchmarks."""
from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}")

_CORPUS = [
    "Tell me a story about the Rust type system.",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a compiler that loved borrowing and lifetimes.",
    "What is the capital of France? Paris is the capital of France.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Emoji: 🦀🚀 and 日本語のテキスト.",
]


def write_tiny_tokenizer(out: Path, vocab_size: int = 384) -> None:
    """A byte-level BPE tokenizer with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "chat_template": CHATML_TEMPLATE, "add_bos_token": False}))


def tokenizer_vocab_size(out: Path) -> int:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def write_random_llama(out: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                       intermediate: int = 128, vocab: int | None = None, max_pos: int = 2048,
                       tie: bool = False, seed: int = 0, dtype: str = "float32",
                       model_type: str = "llama", architecture: str = "LlamaForCausalLM",
                       generation_config: dict | None = None) -> Path:
    """A random Llama (config.json + model.safetensors) written with torch only."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if not (out / "tokenizer.json").exists():
        write_tiny_tokenizer(out)
    vocab = vocab or tokenizer_vocab_size(out)
    hd = hidden // heads
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(getattr(torch, dtype))

    w = {"model.embed_tokens.weight": rnd(vocab, hidden, std=1.0),
         "model.norm.weight": 1 + rnd(hidden, std=0.1)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rnd(heads * hd, hidden, std=hidden ** -0.5)
        w[p + "self_attn.k_proj.weight"] = rnd(kv_heads * hd, hidden, std=hidden ** -0.5)
        w[p + "self_attn.v_proj.weight"] = rnd(kv_heads * hd, hidden, std=hidden ** -0.5)
        w[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * hd, std=hidden ** -0.5)
        w[p + "mlp.gate_proj.weight"] = rnd(intermediate, hidden, std=hidden ** -0.5)
        w[p + "mlp.up_proj.weight"] = rnd(intermediate, hidden, std=hidden ** -0.5)
        w[p + "mlp.down_proj.weight"] = rnd(hidden, intermediate, std=intermediate ** -0.5)
        w[p + "input_layernorm.weight"] = 1 + rnd(hidden, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(hidden, std=0.1)
    if not tie:
        w["lm_head.weight"] = rnd(vocab, hidden, std=hidden ** -0.5)
    save_file(w, str(out / "model.safetensors"))
    cfg = {"architectures": [architecture], "model_type": model_type, "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": max_pos,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tie, "hidden_act": "silu",
           "torch_dtype": dtype}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config))
    return out


def write_tiny_test_family(out: Path, **kw) -> Path:
    """A model of the test-only ``TinyTest`` family (tests/plugins/tiny_family)."""
    return write_random_llama(out, model_type="mistralrs_tiny", architecture="MistralrsTinyForCausalLM", **kw)


def write_random_qwen3_embedding(out: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                                 kv_heads: int = 2, seed: int = 0) -> Path:
    """A random Qwen3-Embedding folder (a Qwen3 body, pooled on its last token), torch only."""
    import torch
    from safetensors.torch import load_file, save_file

    out = write_random_llama(out, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, seed=seed,
                             tie=True, model_type="qwen3", architecture="Qwen3ForCausalLM")
    head_dim = hidden // heads
    weights = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(layers):
        for norm in ("q_norm", "k_norm"):
            weights[f"model.layers.{i}.self_attn.{norm}.weight"] = 1 + 0.1 * torch.randn(head_dim, generator=g)
    save_file(weights, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["head_dim"] = head_dim
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out
