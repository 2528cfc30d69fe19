"""Writes the upstream-compatibility test data: a tiny Llama (float16-exact float32 weights,
a 512-piece tokenizer) and the UQFF files the Rust ``mistralrs`` wheel writes from it with
in-situ quantization, one directory per type. Run once, with the Rust wheel in its own venv
(it cannot share a venv with this project, which owns the ``mistralrs`` import name):

    python3 -m venv /tmp/rs && /tmp/rs/bin/pip install --only-binary mistralrs mistralrs==0.9.5 torch numpy safetensors tokenizers
    /tmp/rs/bin/python plugins/quant/tests/data/make_upstream_uqff.py

(from a directory where ``import mistralrs`` finds the wheel, not this checkout). The float
model is kept as float16 (``model.f16.safetensors``, every value exactly representable) so the
test can rebuild the float32 input the wheel quantized.

MoE data (``write_moe``): a tiny Mixtral (one layer, 4 experts) quantized to Q8_0
(``mixtral/``), AFQ4 and AFQ3 (``mixtral_afq4/``, ``mixtral_afq3/``), kept whole, its float
weights remade from the seed by the tests; ``moe_layouts.json``, the entries (names, dtypes,
shapes, small integer values) upstream writes for that Mixtral at Q8_0/AFQ4/AFQ3/Q4K and for a
tiny Qwen3-MoE at Q8_0/AFQ4; and, in ``written_by.json``, the types the wheel refuses for MoE
experts. Tensors whose bytes did not change keep their committed files (safetensors headers
list upstream's metadata in a random order).
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


#: MoE UQFFs kept whole: Q8_0 (``mixtral/``, GGML experts stacked [E, out, in] blocks) and
#: the AFQ widths (``mixtral_afq4/`` ...: experts stacked as [E, out, words] + scales/biases).
#: Upstream 0.9.5 refuses HQQ4/HQQ8/FP8/F8Q8/MXFP4 for MoE experts ("that target does not
#: support stacked expert gather"), recorded in ``written_by.json`` under ``moe_refused``.
MOE_TYPES = {"Q8_0": "mixtral", "AFQ4": "mixtral_afq4", "AFQ3": "mixtral_afq3"}
MOE_REFUSED = ["HQQ4", "HQQ8", "FP8", "F8Q8", "MXFP4"]

QWEN3_MOE = {**CONFIG, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
             "num_experts_per_tok": 2, "moe_intermediate_size": 256, "norm_topk_prob": True,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "max_window_layers": 1, "use_sliding_window": False,
             "sliding_window": None, "tie_word_embeddings": False}


def qwen3_moe_weights() -> dict[str, np.ndarray]:
    """A Qwen3-MoE layer (router ``mlp.gate``): only its UQFF layout is recorded."""
    rng = np.random.default_rng(2)
    h = CONFIG["hidden_size"]
    shapes = {"model.embed_tokens.weight": (CONFIG["vocab_size"], h), "lm_head.weight": (CONFIG["vocab_size"], h),
              "model.norm.weight": (h,), "model.layers.0.input_layernorm.weight": (h,),
              "model.layers.0.post_attention_layernorm.weight": (h,), "model.layers.0.self_attn.q_proj.weight": (h, h),
              "model.layers.0.self_attn.k_proj.weight": (128, h), "model.layers.0.self_attn.v_proj.weight": (128, h),
              "model.layers.0.self_attn.o_proj.weight": (h, h), "model.layers.0.self_attn.q_norm.weight": (64,),
              "model.layers.0.self_attn.k_norm.weight": (64,), "model.layers.0.mlp.gate.weight": (4, h)}
    for e in range(4):
        for p, shape in (("gate_proj", (256, h)), ("up_proj", (256, h)), ("down_proj", (h, 256))):
            shapes[f"model.layers.0.mlp.experts.{e}.{p}.weight"] = shape
    return {name: ((1 + 0.1 * rng.standard_normal(s)) if name.endswith("norm.weight")
                   else rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float16) for name, s in shapes.items()}


def _float_folder(tmp: Path, name: str, config: dict, w16: dict) -> Path:
    from safetensors.numpy import save_file
    src = tmp / name
    src.mkdir()
    save_file({k: v.astype(np.float32) for k, v in w16.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(OUT / "tokenizer.json", src / "tokenizer.json")
    return src


def _layout(directory: Path) -> dict:
    """Every entry's dtype and shape of a UQFF directory, with the values of the small
    integer ones (format tags, bits, group sizes, ggml type ids, shapes, version)."""
    from safetensors import safe_open
    out = {}
    for f in ("tiny-0.uqff", "residual.safetensors"):
        with safe_open(str(directory / f), "np") as h:
            out[f] = {k: [str(t.dtype), list(t.shape)] + ([t.reshape(-1).tolist()] if t.size <= 4 and
                                                            t.dtype.kind in "ui" else [])
                      for k in sorted(h.keys()) for t in [h.get_tensor(k)]}
    return out


def write_moe(tmp: Path) -> dict:
    """The MoE data: Mixtral UQFFs kept whole (``MOE_TYPES``; the test remakes the float
    weights from the seed), and the layouts (entry names, dtypes, shapes) upstream writes
    for Mixtral at Q4K and for a Qwen3-MoE at Q8_0 and AFQ4: which tensors it quantizes
    (the router of one family and not the other's)."""
    import mistralrs
    src = _float_folder(tmp, "mixtral-f32", MIXTRAL, mixtral_weights())
    qwen = _float_folder(tmp, "qwen3moe-f32", QWEN3_MOE, qwen3_moe_weights())
    layouts, refused = {}, {}
    runs = [(src, q, d) for q, d in MOE_TYPES.items()] + [(src, "Q4K", None), (qwen, "Q8_0", None),
                                                         (qwen, "AFQ4", None)]
    runs += [(src, q, None) for q in MOE_REFUSED]
    for model, q, keep in runs:
        dest = tmp / f"{model.name}-{q}"
        try:
            mistralrs.Runner(which=mistralrs.Which.Plain(model_id=str(model), write_uqff=str(dest / "tiny.uqff")),
                             in_situ_quant=q)
        except Exception as e:  # noqa: BLE001 - record what the wheel refuses
            refused[q] = str(e).splitlines()[0]
            continue
        layouts[f"{model.name.split('-')[0]}/{q}"] = _layout(dest)
        if keep is not None:
            out = OUT / keep
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            (out / "config.json").write_text(json.dumps(MIXTRAL, indent=1))
            for f in ("tiny-0.uqff", "residual.safetensors"):
                shutil.copy(dest / f, out / f)
    (OUT / "moe_layouts.json").write_text(json.dumps(layouts, indent=1))
    return refused


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
        refused = write_moe(Path(tmp))
        (OUT / "written_by.json").write_text(json.dumps(
            {"mistralrs": md.version("mistralrs"), "types": done, "moe_types": MOE_TYPES,
             "moe_refused": refused}, indent=1))
        print(json.dumps(done, indent=1))


if __name__ == "__main__":
    main()
