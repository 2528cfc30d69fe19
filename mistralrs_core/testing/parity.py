"""Helpers plugin authors use to prove a family matches its reference implementation.

Typical use in a test::

    ref = transformers.LlamaForCausalLM(tiny_config).eval()
    perturb_parameters(ref)
    model_dir = save_reference(ref, tmp_path)
    ours = load_for_test(model_dir, "Llama")
    check = compare_logits(ref, ours, prompts)       # max relative error per step
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.layers.recurrent import make_layer_cache


def perturb_parameters(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every parameter (and float buffer) away from its constant init (norm weights of
    ones, zero biases), so a test cannot pass by accident of symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale
            p.add_(noise.to(p.dtype))


def save_reference(model, out_dir: str | Path, extra_files: dict | None = None) -> Path:
    """Save a transformers model as safetensors + config.json (no pickle)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name, content in (extra_files or {}).items():
        (out / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return out


def load_for_test(model_dir: str | Path, arch: str | None = None, dtype=torch.float32):
    from mistralrs_core.loading.model_loader import build_text_model
    return build_text_model(Path(model_dir), arch=arch, dtype=dtype, device="cpu")[0]


class SingleSequence:
    """Runs one sequence through a model with its own small paged cache."""

    def __init__(self, model, block_size: int = 4, num_blocks: int = 64):
        self.model = model
        self.block_size = block_size
        self.caches = [make_layer_cache(s, num_blocks, block_size, model.dtype, "cpu")
                       for s in model.kv_cache_specs()]
        self.blocks = list(range(num_blocks))
        self.pos = 0

    @torch.inference_mode()
    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Logits for every token fed in this step, [len(token_ids), vocab]."""
        ids, pos, meta = build_metadata([(token_ids, self.pos, self.blocks)], self.block_size, "cpu")
        hidden = self.model(ids, pos, meta, self.caches)
        self.pos += len(token_ids)
        return self.model.compute_logits(hidden)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max |b|: robust to logits near zero."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@torch.inference_mode()
def reference_logits(ref, input_ids: list[int]) -> torch.Tensor:
    out = ref(torch.tensor([input_ids]))
    return out.logits[0].float()


@torch.inference_mode()
def reference_greedy(ref, prompt: list[int], n: int) -> list[int]:
    """Plain argmax continuation with the reference's own KV cache (no EOS handling, like
    ``our_greedy``: generate()'s min_new_tokens would suppress EOS and differ)."""
    ids = torch.tensor([prompt])
    out = ref(ids, use_cache=True)
    past, tokens = out.past_key_values, []
    for _ in range(n):
        t = int(out.logits[0, -1].argmax())
        tokens.append(t)
        out = ref(torch.tensor([[t]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


def our_greedy(model, prompt: list[int], n: int) -> list[int]:
    run = SingleSequence(model, num_blocks=max(64, (len(prompt) + n) // 4 + 2))
    logits = run.step(prompt)[-1]
    out = []
    for _ in range(n):
        t = int(logits.argmax())
        out.append(t)
        logits = run.step([t])[-1]
    return out


def check_prefill_and_decode(ref, model, prompt: list[int], decode_steps: int = 4) -> float:
    """Max relative logit error over a prefill of ``prompt`` and ``decode_steps`` cached
    decode steps, each compared with the reference run on the full sequence."""
    run = SingleSequence(model)
    worst = max_rel_err(run.step(prompt), reference_logits(ref, prompt))
    seq = list(prompt)
    for i in range(decode_steps):
        nxt = (seq[-1] * 7 + 3 + i) % model_vocab(model)
        seq.append(nxt)
        ours = run.step([nxt])[-1]
        theirs = reference_logits(ref, seq)[-1]
        worst = max(worst, max_rel_err(ours, theirs))
    return worst


def model_vocab(model) -> int:
    return model.cfg.vocab_size


@torch.inference_mode()
def check_batched_equals_alone(model, prompts: list[list[int]], decode_steps: int = 2,
                               block_size: int = 4) -> float:
    """Max relative logit error of several prompts run as one batch (prefill together, then
    ``decode_steps`` decodes together) versus each prompt run alone.

    Every sequence owns its own blocks of one shared pool, so a mistake in slot mapping,
    padding or masks across sequences shows up as a mismatch."""
    per_seq = [-(-(len(p) + decode_steps) // block_size) for p in prompts]
    caches = [make_layer_cache(s, sum(per_seq), block_size, model.dtype, "cpu", len(prompts))
              for s in model.kv_cache_specs()]
    # Hand out block ids in a scrambled order so no sequence owns a contiguous range.
    pool = iter(sorted(range(sum(per_seq)), key=lambda b: (b % len(prompts), b)))
    blocks = [[next(pool) for _ in range(n)] for n in per_seq]

    def run(chunks):
        ids, pos, meta = build_metadata(chunks, block_size, "cpu")
        return model.compute_logits(model(ids, pos, meta, caches))

    alone = [SingleSequence(model, block_size=block_size, num_blocks=n) for n in per_seq]
    batched = run([(p, 0, blocks[i]) for i, p in enumerate(prompts)])
    worst, off = 0.0, 0
    for i, p in enumerate(prompts):
        worst = max(worst, max_rel_err(batched[off:off + len(p)], alone[i].step(p)))
        off += len(p)
    last = [int(batched[sum(len(q) for q in prompts[:i + 1]) - 1].argmax()) for i in range(len(prompts))]
    lengths = [len(p) for p in prompts]
    for _ in range(decode_steps):
        batched = run([([t], lengths[i], blocks[i]) for i, t in enumerate(last)])
        for i, t in enumerate(last):
            worst = max(worst, max_rel_err(batched[i], alone[i].step([t])[-1]))
        last = [int(row.argmax()) for row in batched]
        lengths = [n + 1 for n in lengths]
    return worst


def check_family(ref, out_dir: str | Path, arch: str, prompts: list[list[int]], *,
                 greedy_prompt: list[int] | None = None, greedy_tokens: int = 32,
                 decode_steps: int = 4, seed: int = 0):
    """The standard parity run for a family: perturb every parameter of the transformers
    model ``ref``, save it, load it as ``arch``, and return (our model, worst relative
    logit error over prefill + cached decode of every prompt). Asserts that greedy
    decoding of ``greedy_tokens`` tokens matches the reference token for token."""
    ref = ref.float().eval()
    perturb_parameters(ref, seed=seed)
    model = load_for_test(save_reference(ref, out_dir), arch)
    worst = max(check_prefill_and_decode(ref, model, p, decode_steps) for p in prompts)
    gp = greedy_prompt if greedy_prompt is not None else prompts[0]
    theirs, ours = reference_greedy(ref, gp, greedy_tokens), our_greedy(model, gp, greedy_tokens)
    assert ours == theirs, f"{arch}: greedy tokens differ\nours:   {ours}\ntheirs: {theirs}"
    return model, worst


def random_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()
