"""The ``mistralrs`` command: ``serve`` (OpenAI-compatible HTTP server) and ``run``
(terminal chat). Model flags mirror the ``Which`` variants and ``Runner`` arguments.
The other commands (doctor, bench, from-config, quantize, completion) live one per module
in ``mistralrs_core.cli_tools``."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from mistralrs_core.server.spec import KINDS, ModelSpec, ServeConfig, build_which, load_config

# Flags that become Runner keyword arguments: (flag, dest, type, help).
_RUNNER_FLAGS = (
    ("--max-seqs", "max_seqs", int, "most sequences decoded together (Runner default 16)"),
    ("--prefix-cache-n", "prefix_cache_n", int, "prefix caching; 0 disables"),
    ("--pa-ctxt-len", "pa_ctxt_len", int, "size the KV pool for this many tokens"),
    ("--pa-gpu-mem", "pa_gpu_mem", int, "size the KV pool in MB"),
    ("--pa-gpu-mem-usage", "pa_gpu_mem_usage", float, "size the KV pool as a fraction of device memory"),
    ("--pa-blk-size", "pa_blk_size", int, "tokens per KV block"),
    ("--seed", "seed", int, "seed of the sampling generators"),
    ("--chat-template", "chat_template", str,
     "chat template: a .jinja file, a tokenizer_config-style .json, or literal Jinja"),
    ("--jinja-explicit", "jinja_explicit", str, "Jinja template (file or literal) overriding all others"),
    ("--token-source", "token_source", str, "Hugging Face token: cache, none, env:VAR, path:FILE, literal:TOK"),
    ("--isq", "in_situ_quant", str, "in-situ quantization type"),
    ("--device", "device", str, "torch device (default: cuda if available, else cpu)"),
    ("--max-queue", "max_queue", int, "most sequences waiting for a slot; beyond it requests get 503 "
                                      "with Retry-After (default: no limit)"),
    ("--request-timeout", "request_timeout", float, "seconds a request may run before it fails (default: none)"),
)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model-id", help="model directory or Hugging Face hub id")
    g.add_argument("-f", "--quantized-filename", action="extend", nargs="+", metavar="FILE",
                   help="GGUF file(s) inside the model directory/repository (several for split files)")
    g.add_argument("--tok-model-id", help="tokenizer source for GGUF models")
    g.add_argument("--tokenizer-json", help="explicit tokenizer.json")
    g.add_argument("--arch", help="architecture (default: detected from config.json)")
    g.add_argument("--dtype", help="auto, bf16, f16 or f32")
    g.add_argument("--kind", default="auto", choices=KINDS,
                   help="model kind; auto: GGUF when -f is given, else a plain text model")
    g.add_argument("--config", help="JSON or TOML file naming several models (see docs/architecture.md)")
    r = p.add_argument_group("runner")
    for flag, dest, typ, help in _RUNNER_FLAGS:
        r.add_argument(flag, dest=dest, type=typ, help=help)
    r.add_argument("--no-kv-cache", action="store_true", default=None, help="recompute every step")
    r.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no loading progress on stderr (default: shown on a terminal; "
                        "MISTRALRS_PROGRESS=0/1 also switches it)")


def server_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("-p", "--port", type=int, help="port (default 1234)")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--api-key", default=os.environ.get("MISTRALRS_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $MISTRALRS_API_KEY)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take to finish (default 30)")
    s.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB (default 16)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--tp", type=int, help="tensor-parallel ranks to start on this machine (under torchrun: "
                                         "its WORLD_SIZE); see docs/distributed.md")


def chat_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("chat")
    c.add_argument("-i", "--prompt", help="answer this prompt once (streamed to stdout) and exit")
    c.add_argument("--system", help="system message")
    c.add_argument("--max-tokens", type=int, help="most tokens per answer")
    c.add_argument("--temperature", type=float)
    c.add_argument("--top-p", type=float)
    c.add_argument("--top-k", type=int)
    c.add_argument("--min-p", type=float)
    c.add_argument("--repetition-penalty", type=float)


def parser() -> argparse.ArgumentParser:
    from mistralrs_core.cli_tools import TOOLS
    p = argparse.ArgumentParser(prog="mistralrs", description="mistralrs for Python: local LLM inference")
    names = ["serve", "run", *(t.NAME for t in TOOLS)]
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(names) + "}")
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Serve models over an OpenAI-compatible HTTP API (and the chat page at /ui).")
    _model_args(serve)
    server_args(serve)
    run = sub.add_parser("run", help="chat in the terminal", description="Chat with a model in the terminal.")
    _model_args(run)
    chat_args(run)
    for tool in TOOLS:
        tool.add_parser(sub)
    return p


def _serve_config(args) -> ServeConfig:
    runtime = {dest: getattr(args, dest) for _, dest, _, _ in _RUNNER_FLAGS if getattr(args, dest) is not None}
    if args.no_kv_cache:
        runtime["no_kv_cache"] = True
    if args.progress is not None:
        runtime["progress"] = args.progress
    if args.config:
        if args.model_id or args.quantized_filename:
            raise ValueError("--config: cannot be combined with -m/-f")
        cfg = load_config(args.config)
        cfg.runtime.update(runtime)   # flags on the command line win over the file
        return cfg
    if not args.model_id:
        raise ValueError("-m/--model-id: required (or --config FILE)")
    which = build_which(args.kind, args.model_id, quantized_filename=args.quantized_filename,
                        tok_model_id=args.tok_model_id, arch=args.arch, dtype=args.dtype,
                        tokenizer_json=args.tokenizer_json)
    return ServeConfig([ModelSpec(which)], runtime)


def _sampling(args) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tool = getattr(args, "tool", None)
    if tool is not None:
        return tool.main(args)
    from mistralrs_core.errors import NotAvailableYet
    try:
        cfg = _serve_config(args)
    except (ValueError, OSError, NotAvailableYet) as exc:
        return error(exc)
    return execute(args.command, cfg, args)


def error(exc: BaseException | str) -> int:
    """Report a user-facing failure the way every command does; the exit status."""
    print(f"mistralrs: error: {exc}", file=sys.stderr)
    return 1


def execute(command: str, cfg: ServeConfig, args: argparse.Namespace, *, chat: dict | None = None) -> int:
    """Load ``cfg``'s models and serve them or chat with them (``args``: the server or chat
    flags of ``command``; ``chat``: request fields every chat turn carries)."""
    from mistralrs_core.errors import NotAvailableYet
    from mistralrs_core.server.loading import build_runner
    from mistralrs_core.distributed import launch, serve_workers, stop_workers
    try:
        # Tensor parallelism: every rank loads its shard; ranks > 0 then serve rank 0's steps.
        tp = launch.setup(getattr(args, "tp", None), device=cfg.runtime.get("device")) \
            if command == "serve" else None
        runner = build_runner(cfg.models, cfg.runtime)
    except (ValueError, OSError, NotAvailableYet) as exc:
        return error(exc)
    try:
        if tp is not None and not tp.is_driver:
            return _serve_rank(serve_workers)
        if command == "serve":
            from mistralrs_core.server.app import serve
            host = args.host or cfg.server.get("host", "127.0.0.1")
            port = args.port or cfg.server.get("port", 1234)
            print(f"mistralrs: serving {', '.join(runner.list_models())} on http://{host}:{port}/v1",
                  file=sys.stderr, flush=True)
            serve(runner, host=host, port=port, api_key=args.api_key, log_level=args.log_level,
                  drain_timeout=args.drain_timeout, max_body_bytes=int(args.max_body_mb * (1 << 20)))
            return 0
        return _run(runner, args, chat)
    finally:
        stop_workers()
        runner.shutdown()


def _serve_rank(serve_workers) -> int:
    from mistralrs_core.distributed import DistributedError
    try:
        serve_workers()
    except DistributedError as exc:
        return error(exc)
    return 0


def _run(runner, args, extra: dict | None = None) -> int:
    from mistralrs_core.server.interactive import chat_loop, stream_answer
    # Answers may hold any character; never die on a terminal that cannot show one.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    sampling = {**(extra or {}), **_sampling(args)}
    if args.prompt is None:
        return chat_loop(runner, sampling, system=args.system)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    try:
        stream_answer(runner, messages + [{"role": "user", "content": args.prompt}], sampling, sys.stdout)
    except (ValueError, NotImplementedError) as exc:
        print(f"mistralrs: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
