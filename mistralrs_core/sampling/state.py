"""Per-sequence sampler input and per-step sampler output."""

from __future__ import annotations

import attrs
import torch

from .params import SamplingParams


class SamplingState:
    """What the sampler needs to know about one running sequence.

    The engine owns it and appends each sampled token to `output_ids`; the sampler only
    reads it. `generator` is seeded per sequence by the engine, so a sequence's draws do
    not depend on which other sequences share its batch. With `generator=None` the global
    torch RNG is used (not reproducible across batch compositions).
    """

    __slots__ = ("params", "prompt_ids", "output_ids", "generator")

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        output_ids: list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.params = params
        self.prompt_ids = prompt_ids
        self.output_ids = [] if output_ids is None else output_ids
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"SamplingState(params={self.params!r}, prompt_ids=<{len(self.prompt_ids)} ids>, "
            f"output_ids=<{len(self.output_ids)} ids>, generator={self.generator!r})"
        )


@attrs.frozen
class SampledToken:
    """One sampled token.

    `logprob` is the log-probability of `token_id` under the raw model distribution
    (before penalties, bias, temperature and filtering), None unless the request asked
    for logprobs. `top_logprobs` holds that distribution's `top_logprobs` most likely
    (token_id, logprob) pairs, highest first; it is an empty list when logprobs were
    requested without `top_logprobs`, and None when logprobs were not requested.
    """

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
