"""``mistralrs bench``: prefill, decode and concurrent throughput through the Runner.

Each request is a streamed completion of a ``--prompt-len``-token prompt that generates
exactly ``--gen-len`` tokens (EOS ignored, greedy). Its own cache salt keeps the prefix
cache from answering a prompt an earlier request already computed, so every prefill is a
real one. Per concurrency level, ``c`` requests start together; the table shows medians
over ``--iterations`` rounds:

- prefill: prompt tokens / time to the first token (one request alone);
- decode: tokens after the first / time after the first (one request alone);
- concurrent c: all generated tokens / wall time of the round, and the mean first-token time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from typing import Any, NamedTuple

NAME = "bench"
_FILLER = "The quick brown fox jumps over the lazy dog while the river keeps running to the sea. "


class Sample(NamedTuple):
    prompt_tokens: int
    gen_tokens: int
    first_s: float     # request start -> first chunk
    total_s: float     # request start -> last chunk


def add_parser(sub: Any) -> None:
    from mistralrs_core.cli import _model_args
    p = sub.add_parser(NAME, help="measure prefill, decode and concurrent throughput",
                       description="Benchmark a model through the Runner: prefill and decode speed of one "
                                   "request, and throughput with several at once; prints a table.")
    _model_args(p)
    b = p.add_argument_group("bench")
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    b.add_argument("--gen-len", type=int, default=64, help="tokens generated per request (default 64)")
    b.add_argument("--concurrency", default="1,4",
                   help="comma-separated numbers of requests run at once (default 1,4)")
    b.add_argument("--iterations", type=int, default=3, help="rounds per measurement; medians shown (default 3)")
    b.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    p.set_defaults(tool=sys.modules[__name__])


def parse_concurrency(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--concurrency: must be comma-separated integers, got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"--concurrency: every level must be >= 1, got {text!r}")
    return levels


def check_args(args: argparse.Namespace) -> list[int]:
    for flag, value, least in (("--prompt-len", args.prompt_len, 1), ("--gen-len", args.gen_len, 2),
                               ("--iterations", args.iterations, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            raise ValueError(f"{flag}: must be >= {least}, got {value}")
    return parse_concurrency(args.concurrency)


def make_prompt(runner: Any, tokens: int) -> str:
    """Text of about ``tokens`` tokens for this model's tokenizer."""
    ids = runner.tokenize_text(_FILLER, add_special_tokens=False)
    per = max(len(ids), 1)
    text = _FILLER * (tokens // per + 2)
    ids = runner.tokenize_text(text, add_special_tokens=False)[:tokens]
    return runner.detokenize_text(ids, skip_special_tokens=True)


def one_request(runner: Any, prompt: str, gen_len: int) -> Sample:
    from mistralrs_core.api.requests import CompletionRequest
    request = CompletionRequest(prompt=prompt, max_tokens=gen_len, temperature=0.0, ignore_eos=True,
                                cache_salt=uuid.uuid4().hex)
    start = time.perf_counter()
    first = None
    usage = None
    for chunk in runner.stream_completion_request(request):
        if first is None:
            first = time.perf_counter()
        usage = chunk.usage or usage
    end = time.perf_counter()
    prompt_tokens = usage.prompt_tokens if usage is not None else 0
    gen = usage.completion_tokens if usage is not None else gen_len
    return Sample(prompt_tokens, gen, (first or end) - start, end - start)


def concurrent_round(runner: Any, prompt: str, gen_len: int, c: int) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(c)

    def work() -> None:
        try:
            barrier.wait()
            samples.append(one_request(runner, prompt, gen_len))
        except BaseException as exc:  # re-raised below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(c)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return samples, time.perf_counter() - start


def measure(runner: Any, *, prompt_len: int, gen_len: int, levels: list[int], iterations: int,
            warmup: int) -> list[dict]:
    """The table's rows: dicts with test, concurrency, prompt_tokens, gen_tokens, ttft_ms, tok_s."""
    prompt = make_prompt(runner, prompt_len)
    for _ in range(warmup):
        one_request(runner, prompt, 2)
    rows: list[dict] = []
    alone = [one_request(runner, prompt, gen_len) for _ in range(iterations)]
    rows.append(dict(test="prefill", concurrency=1, prompt_tokens=alone[0].prompt_tokens, gen_tokens=1,
                     ttft_ms=1000 * statistics.median(s.first_s for s in alone),
                     tok_s=statistics.median(s.prompt_tokens / s.first_s for s in alone)))
    rows.append(dict(test="decode", concurrency=1, prompt_tokens=alone[0].prompt_tokens,
                     gen_tokens=alone[0].gen_tokens, ttft_ms=None,
                     tok_s=statistics.median((s.gen_tokens - 1) / max(s.total_s - s.first_s, 1e-9)
                                             for s in alone)))
    for c in levels:
        rounds = [concurrent_round(runner, prompt, gen_len, c) for _ in range(iterations)]
        rows.append(dict(test=f"concurrent {c}", concurrency=c, prompt_tokens=rounds[0][0][0].prompt_tokens,
                         gen_tokens=sum(s.gen_tokens for s in rounds[0][0]),
                         ttft_ms=1000 * statistics.median(statistics.mean(s.first_s for s in ss)
                                                          for ss, _ in rounds),
                         tok_s=statistics.median(sum(s.gen_tokens for s in ss) / wall for ss, wall in rounds)))
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("test", "concurrency", "prompt tok", "gen tok", "TTFT ms", "tok/s")
    body = [(r["test"], str(r["concurrency"]), str(r["prompt_tokens"]), str(r["gen_tokens"]),
             "-" if r["ttft_ms"] is None else f"{r['ttft_ms']:.1f}", f"{r['tok_s']:.1f}") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([line, fmt(head), line, *map(fmt, body), line])


def main(args: argparse.Namespace) -> int:
    from mistralrs_core.cli import _serve_config, error
    from mistralrs_core.errors import NotAvailableYet
    from mistralrs_core.server.loading import build_runner
    try:
        levels = check_args(args)
        cfg = _serve_config(args)
        if len(cfg.models) != 1:
            raise ValueError(f"--config: bench measures one model, the file names {len(cfg.models)}")
        cfg.runtime.setdefault("max_seqs", max(levels))
        runner = build_runner(cfg.models, cfg.runtime)
    except (ValueError, OSError, NotAvailableYet) as exc:
        return error(exc)
    try:
        rows = measure(runner, prompt_len=args.prompt_len, gen_len=args.gen_len, levels=levels,
                       iterations=args.iterations, warmup=args.warmup)
    except (ValueError, NotImplementedError) as exc:
        return error(exc)
    finally:
        runner.shutdown()
    print(f"model: {cfg.models[0].label}")
    print(format_table(rows))
    return 0
