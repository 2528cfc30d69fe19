"""A sequence is one choice of one request moving through the engine."""
from __future__ import annotations

import enum
import itertools
import time

_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    __slots__ = ("id", "group", "index", "prompt_ids", "output_ids", "blocks", "block_hashes",
                 "num_computed", "status", "state", "detok", "text", "emitted", "finish_reason",
                 "logprobs", "arrival", "first_token_time", "admitted_time", "preemptions", "stop_at",
                 "max_tokens", "prompt_len", "state_slot", "_tokens", "draft", "slot_fresh", "grammar", "processor")

    def __init__(self, group, index: int, prompt_ids: list[int], state, detok, max_tokens: int):
        self.id = next(_ids)
        self.group = group                 # the owning request (engine.RequestGroup)
        self.index = index                 # choice index
        self.prompt_ids = prompt_ids
        self.prompt_len = len(prompt_ids)
        self.output_ids: list[int] = []
        # prompt + output in one list, appended in step with output_ids, so that reading
        # the whole sequence costs nothing per step
        self._tokens: list[int] = list(prompt_ids)
        self.draft: list[int] = []         # proposed tokens to verify in the next step
        self.blocks: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_computed = 0              # tokens whose K/V sit in the cache
        self.status = SeqStatus.WAITING
        self.state = state                 # sampling.SamplingState (shares output_ids)
        self.detok = detok
        self.text = ""                     # full decoded output text so far
        self.emitted = 0                   # chars of ``text`` already sent to a stream
        self.finish_reason: str | None = None
        self.logprobs: list = []
        self.arrival = time.perf_counter()
        self.admitted_time: float | None = None
        self.first_token_time: float | None = None
        self.preemptions = 0
        self.stop_at: int | None = None    # char index where a stop string begins
        self.max_tokens = max_tokens
        self.state_slot: int | None = None  # recurrent-state slot while admitted
        self.slot_fresh = False            # admitted since its last step: its slot's state is stale
        self.grammar = None                # constrained.SequenceGrammar when the request has one
        self.processor = None              # its logits processor (the grammar's mask last)

    @property
    def token_ids(self) -> list[int]:
        """Prompt and output so far (the sequence's own list: read it, never mutate it)."""
        return self._tokens

    def append_token(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self._tokens.append(token_id)

    @property
    def decoding(self) -> bool:
        """Only the last sampled token is still to be computed."""
        return self.num_computed == len(self._tokens) - 1 and bool(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self):
        return (f"Sequence(id={self.id}, prompt={self.prompt_len}, out={len(self.output_ids)}, "
                f"computed={self.num_computed}, {self.status.name})")
