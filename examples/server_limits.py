"""Admission control and request timeouts on a Runner (the server's --max-queue and
--request-timeout): a tiny random model, one batch slot, a queue of one.

    python examples/server_limits.py
"""
import tempfile
import threading
from pathlib import Path

from typing import Any

from mistralrs import ChatCompletionRequest, ModelDType, Runner, Which
from mistralrs_core.errors import QueueFull, RequestTimedOut
from mistralrs_core.testing.tiny import write_random_llama


def ask(runner: Runner, max_tokens: int) -> Any:
    return runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=max_tokens,
        temperature=0, ignore_eos=True))


def main() -> None:
    model = write_random_llama(Path(tempfile.mkdtemp()) / "tiny")
    runner = Runner(which=Which.Plain(model_id=str(model), dtype=ModelDType.F32), max_seqs=1, max_queue=1,
                    request_timeout=5.0)
    outcomes: list[str] = []

    def one() -> None:
        try:
            outcomes.append(f"answered: {ask(runner, 1500).choices[0].finish_reason}")
        except QueueFull as exc:
            outcomes.append(f"refused at once: {exc}")
        except RequestTimedOut as exc:
            outcomes.append(f"timed out: {exc}")

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\n".join(sorted(outcomes)))
    print("a short request still works:", ask(runner, 2).choices[0].finish_reason)
    runner.shutdown()


if __name__ == "__main__":
    main()
