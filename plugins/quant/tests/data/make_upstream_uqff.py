"""Writes the upstream-compatibility test data: a tiny Llama (float16-exact float32 weights,
a 512-piece tokenizer) and the UQFF files the Rust ``mistralrs`` wheel writes from it with
in-situ quantization, one directory per type. Run once, with the Rust wheel in its own venv
(it cannot share a venv with this project, which owns the ``mistralrs`` import name):

    python3 -m venv /tmp/rs && /tmp/rs/bin/pip install --only-binary mistralrs mistralrs==0.9.5 torch numpy safetensors tokenizers
    /tmp/rs/bin/python plugins/quant/tests/data/make_upstream_uqff.py

(from a directory where ``import mistralrs`` finds the wheel, not this checkout). The float
model is kept as float16 (``model.f16.safetensors``, every value exactly representable) so the
test can rebuild the float32 input the wheel quantized.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "upstream_uqff"
TYPES = ["Q4_0", "Q8_0", "Q4K", "HQQ4", "FP8"]
CONFIG = {"vocab_size": 320, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 256,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "model_type": "llama",
          "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
          "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None, "torch_dtype": "float32"}


def tokenizer_json() -> str:
    """A byte-level BPE over the 256 byte symbols and a few merges (upstream derives its
    decoder from the tokenizer's, and knows byte-level ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    letters = "etaoinsrhl"
    for a in letters:
        for b in letters:
            if len(vocab) >= CONFIG["vocab_size"]:
                break
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    h, i, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "model.layers.0.input_layernorm.weight": (h,), "model.layers.0.post_attention_layernorm.weight": (h,),
              "model.layers.0.self_attn.q_proj.weight": (h, h), "model.layers.0.self_attn.k_proj.weight": (kv, h),
              "model.layers.0.self_attn.v_proj.weight": (kv, h), "model.layers.0.self_attn.o_proj.weight": (h, h),
              "model.layers.0.mlp.gate_proj.weight": (i, h), "model.layers.0.mlp.up_proj.weight": (i, h),
              "model.layers.0.mlp.down_proj.weight": (h, i)}
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = w.astype(np.float16)
    return out


MIXTRAL = {**CONFIG, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 4,
           "num_experts_per_tok": 2, "router_aux_loss_coef": 0.0, "output_router_logits": False,
           "sliding_window": None, "tie_word_embeddings": False}


def mixtral_weights() -> dict[str, np.ndarray]:
    """One MoE layer of 4 experts: upstream writes the experts as 3-D stacks."""
    rng = np.random.default_rng(1)
    h, i, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    moe = "model.layers.0.block_sparse_moe"
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,),
              "model.layers.0.input_layernorm.weight": (h,), "model.layers.0.post_attention_layernorm.weight": (h,),
              "model.layers.0.self_attn.q_proj.weight": (h, h), "model.layers.0.self_attn.k_proj.weight": (kv, h),
              "model.layers.0.self_attn.v_proj.weight": (kv, h), "model.layers.0.self_attn.o_proj.weight": (h, h),
              f"{moe}.gate.weight": (4, h)}
    for e in range(4):
        shapes.update({f"{moe}.experts.{e}.w1.weight": (i, h), f"{moe}.experts.{e}.w3.weight": (i, h),
                       f"{moe}.experts.{e}.w2.weight": (h, i)})
    return {name: ((1 + 0.1 * rng.standard_normal(s)) if name.endswith("norm.weight")
                   else rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float16) for name, s in shapes.items()}


def write_mixtral(tmp: Path) -> None:
    """``mixtral/``: the MoE model quantized by upstream to Q8_0 (experts and router)."""
    import mistralrs
    from safetensors.numpy import save_file
    keep = OUT / "mixtral"
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir()
    w16 = mixtral_weights()     # not stored: the test remakes them from the seed
    (keep / "config.json").write_text(json.dumps(MIXTRAL, indent=1))
    src = tmp / "mixtral-f32"
    src.mkdir()
    save_file({k: v.astype(np.float32) for k, v in w16.items()}, str(src / "model.safetensors"))
    shutil.copy(keep / "config.json", src / "config.json")
    shutil.copy(OUT / "tokenizer.json", src / "tokenizer.json")
    mistralrs.Runner(which=mistralrs.Which.Plain(model_id=str(src), write_uqff=str(tmp / "mq" / "tiny.uqff")),
                     in_situ_quant="Q8_0")
    for f in ("tiny-0.uqff", "residual.safetensors"):
        shutil.copy(tmp / "mq" / f, keep / f)


def main() -> None:
    from safetensors.numpy import save_file
    OUT.mkdir(exist_ok=True)
    w16 = weights()
    save_file(w16, str(OUT / "model.f16.safetensors"))
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=1))
    (OUT / "tokenizer.json").write_text(tokenizer_json())
    import mistralrs
    import importlib.metadata as md
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f32"
        src.mkdir()
        save_file({k: v.astype(np.float32) for k, v in w16.items()}, str(src / "model.safetensors"))
        shutil.copy(OUT / "config.json", src / "config.json")
        shutil.copy(OUT / "tokenizer.json", src / "tokenizer.json")
        done = {}
        for q in TYPES:
            dest = Path(tmp) / q.lower()
            try:
                mistralrs.Runner(which=mistralrs.Which.Plain(model_id=str(src), write_uqff=str(dest / "tiny.uqff")),
                                 in_situ_quant=q)
            except Exception as e:  # noqa: BLE001 - record what the wheel refuses
                print(f"{q}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            keep = OUT / q.lower()
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir()
            for f in dest.iterdir():
                if f.suffix in (".uqff",) or f.name == "residual.safetensors":
                    shutil.copy(f, keep / f.name)
            done[q] = sorted(p.name for p in keep.iterdir())
        write_mixtral(Path(tmp))
        (OUT / "written_by.json").write_text(json.dumps(
            {"mistralrs": md.version("mistralrs"), "types": done}, indent=1))
        print(json.dumps(done, indent=1))


if __name__ == "__main__":
    main()
