"""Prometheus metrics in the text exposition format, written by hand (a few counters and
histograms do not justify a dependency).

HTTP metrics are recorded by an ASGI middleware so that every response counts, including
errors raised before a route runs (401, 404) and streams, whose latency runs to the last
byte. Engine gauges are read from the Runner at scrape time rather than pushed, so they
are never stale and cost nothing between scrapes.
"""
from __future__ import annotations

import bisect
import threading
import time

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels, amount: float = 1) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0) + amount

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.label_names, key)} {_num(v)}")
        return out


class Histogram:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS):
        self.name, self.help, self.label_names = name, help, labels
        self.buckets = tuple(buckets)
        self.series: dict[tuple, list] = {}   # labels -> [per-bucket counts, sum, count]
        self._lock = threading.Lock()

    def observe(self, value: float, *labels) -> None:
        with self._lock:
            counts, total, n = self.series.get(labels) or ([0] * len(self.buckets), 0.0, 0)
            i = bisect.bisect_left(self.buckets, value)
            if i < len(counts):
                counts[i] += 1
            self.series[labels] = [counts, total + value, n + 1]

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, total, n) in sorted(self.series.items()):
            cumulative = 0
            for bound, c in zip(self.buckets, counts):
                cumulative += c
                le = _labels(self.label_names, key, 'le="%s"' % bound)
                out.append(f"{self.name}_bucket{le} {cumulative}")
            le = _labels(self.label_names, key, 'le="+Inf"')
            out.append(f"{self.name}_bucket{le} {n}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {n}")
        return out


# Engine gauges read at scrape time: (metric suffix, snapshot key, help).
_ENGINE_GAUGES = (
    ("queue_depth", "waiting", "Sequences waiting to be scheduled."),
    ("running_sequences", "running", "Sequences in the running batch."),
    ("kv_cache_blocks_used", "kv_blocks_used", "Paged KV cache blocks referenced by sequences."),
    ("kv_cache_blocks_total", "kv_blocks_total", "Paged KV cache blocks in the pool."),
)
_ENGINE_COUNTERS = (
    ("engine_generated_tokens_total", "generated_tokens", "Tokens sampled by the engine (since load)."),
    ("engine_prompt_tokens_computed_total", "prompt_tokens_computed",
     "Prompt tokens run through the model, prefix-cache hits excluded (since load)."),
    ("engine_steps_total", "steps", "Engine steps (one batched forward each, since load)."),
    ("engine_draft_tokens_total", "draft_tokens", "Speculative decoding: drafted tokens verified (since load)."),
    ("engine_accepted_draft_tokens_total", "accepted_draft_tokens",
     "Speculative decoding: drafted tokens the target kept (since load)."),
)


class Metrics:
    def __init__(self, prefix: str = "mistralrs"):
        p = prefix
        self.prefix = p
        self.requests = Counter(f"{p}_http_requests_total", "HTTP requests by route and status.",
                                ("route", "status"))
        self.latency = Histogram(f"{p}_http_request_duration_seconds",
                                 "HTTP request latency (streams: until the last byte).", ("route",))
        self.prompt_tokens = Counter(f"{p}_prompt_tokens_total", "Prompt tokens of served requests.",
                                     ("model",))
        self.completion_tokens = Counter(f"{p}_completion_tokens_total",
                                         "Completion tokens of served requests.", ("model",))
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds",
                              "Streamed requests: time from arrival to the first chunk.", ("model",))
        self.disconnects = Counter(f"{p}_client_disconnects_total",
                                   "Streams whose client went away before the end (generation cancelled).",
                                   ("route",))
        self.active_streams = 0
        self.started = time.time()

    def record_usage(self, model: str, usage: dict | None) -> None:
        if not usage:
            return
        self.prompt_tokens.inc(model, amount=usage.get("prompt_tokens", 0))
        self.completion_tokens.inc(model, amount=usage.get("completion_tokens", 0))

    def render(self, runner) -> str:
        lines: list[str] = []
        for m in (self.requests, self.latency, self.prompt_tokens, self.completion_tokens, self.ttft,
                  self.disconnects):
            lines += m.render()
        p = self.prefix
        lines += [f"# HELP {p}_active_streams Streaming responses in progress.",
                  f"# TYPE {p}_active_streams gauge", f"{p}_active_streams {self.active_streams}"]
        models = runner.list_models()
        stats = {m: runner.engine_stats(m) for m in models}
        lines += [f"# HELP {p}_model_loaded 1 if the model's weights are loaded.",
                  f"# TYPE {p}_model_loaded gauge"]
        lines += [f"{p}_model_loaded{_labels(('model',), (m,))} {int(runner.is_model_loaded(m))}"
                  for m in models]
        for kind, table in (("gauge", _ENGINE_GAUGES), ("counter", _ENGINE_COUNTERS)):
            for suffix, key, help in table:
                lines += [f"# HELP {p}_{suffix} {help}", f"# TYPE {p}_{suffix} {kind}"]
                lines += [f"{p}_{suffix}{_labels(('model',), (m,))} {s.get(key, 0)}"
                          for m, s in stats.items() if s is not None]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts and times every HTTP response; unknown paths share one label so that
    scanners cannot blow up the series count."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        start = time.perf_counter()
        status = 500

        async def observe_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe_send)
        finally:
            self.metrics.requests.inc(route, str(status))
            self.metrics.latency.observe(time.perf_counter() - start, route)
