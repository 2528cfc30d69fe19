"""In-situ quantization of a mixture-of-experts model, offline.

A tiny random Qwen3-MoE (one tensor per expert, as Hugging Face checkpoints store them) is
quantized while it loads: every expert's gate / up / down to Q4K with an importance matrix
computed per expert from a calibration text (each expert weighted by the rows its router
sent to it, as llama.cpp's imatrix tool does), saved as UQFF and loaded back; then only
the experts (``organization=MoQE``) and a re-quantization to Q8_0. Decode steps run in the
C++ decoder step, experts included. (Random weights: the continuations are noise; what
to compare is that the UQFF load gives the ISQ load's text exactly.)

    python examples/isq_moe.py
"""
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mistralrs import CompletionRequest, IsqOrganization, Runner, Which
from mistralrs_core.testing.tiny import tokenizer_vocab_size, write_tiny_tokenizer


def write_tiny_qwen3_moe(out: Path, hidden: int = 256, experts: int = 4, layers: int = 2) -> Path:
    write_tiny_tokenizer(out)
    vocab, g = tokenizer_vocab_size(out), torch.Generator().manual_seed(0)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": rnd(vocab, hidden, std=1.0), "model.norm.weight": 1 + rnd(hidden, std=0.1),
         "lm_head.weight": rnd(vocab, hidden, std=hidden ** -0.5)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, rows in (("q_proj", hidden), ("k_proj", 128), ("v_proj", 128), ("o_proj", hidden)):
            w[f"{p}self_attn.{name}.weight"] = rnd(rows, hidden, std=hidden ** -0.5)   # 2 kv heads of 64
        for name in ("q_norm", "k_norm"):
            w[f"{p}self_attn.{name}.weight"] = 1 + rnd(64, std=0.1)
        for name in ("input_layernorm", "post_attention_layernorm"):
            w[f"{p}{name}.weight"] = 1 + rnd(hidden, std=0.1)
        w[f"{p}mlp.gate.weight"] = rnd(experts, hidden, std=0.5)
        for e in range(experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                w[f"{p}mlp.experts.{e}.{name}.weight"] = rnd(hidden, hidden, std=hidden ** -0.5)
    save_file(w, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": hidden, "moe_intermediate_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": 2,
        "head_dim": 64, "num_experts": experts, "num_experts_per_tok": 2, "norm_topk_prob": True,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32"}))
    return out


work = Path(tempfile.mkdtemp())
model_dir = write_tiny_qwen3_moe(work / "qwen3moe")
calibration = work / "calibration.txt"
calibration.write_text("The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 8)
ask = CompletionRequest(prompt="Once upon a time", model="default", max_tokens=8, temperature=0.0)


def experts_of(runner: Runner) -> str:
    experts = runner._pipeline(None).model.model.layers[0].mlp.experts
    method = experts.quant.parts[(0, "gate")]
    return f"{type(method).__name__} {getattr(getattr(method, 'spec', None), 'name', '')}".strip()


# 1. Q4K with a per-expert importance matrix from the calibration text, saved as UQFF.
runner = Runner(which=Which.Plain(model_id=str(model_dir), calibration_file=str(calibration),
                                  write_uqff=str(work / "uqff")), in_situ_quant="Q4K")
imatrix = runner._pipeline(None).model.quant_config.plan.imatrix
print("imatrix entries for layer 0, expert 1:", sorted(k for k in imatrix if ".experts.1." in k and "layers.0." in k))
print("ISQ Q4K:", experts_of(runner), "->", repr(runner.send_completion_request(ask).choices[0].text))
runner.shutdown()

# 2. The UQFF directory (experts included) loads with no quantization pass.
runner = Runner(which=Which.Plain(model_id=str(work / "uqff"), from_uqff="q4k-0.uqff"))
print("UQFF:", experts_of(runner), "->", repr(runner.send_completion_request(ask).choices[0].text))
runner.shutdown()

# 3. MoQE: only the experts are quantized; then everything re-quantized to Q8_0.
runner = Runner(which=Which.Plain(model_id=str(model_dir), organization=IsqOrganization.MoQE), in_situ_quant="Q4K")
print("MoQE:", experts_of(runner), "->", repr(runner.send_completion_request(ask).choices[0].text))
runner.send_re_isq("Q8_0")
print("after send_re_isq('Q8_0'):", experts_of(runner), "->", repr(runner.send_completion_request(ask).choices[0].text))
runner.shutdown()
