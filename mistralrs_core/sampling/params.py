"""Per-request sampling parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

# The breaker strings upstream uses when a request sets `dry_multiplier` without its own
# list. They stay strings here: the engine tokenizes them with the model's tokenizer.
DEFAULT_DRY_SEQUENCE_BREAKERS: tuple[str, ...] = ("\n", ":", '"', "*")


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _logit_bias(v: Any) -> dict[int, float] | None:
    # JSON object keys arrive as strings ("50256": -100), so normalise them once here.
    if v is None:
        return None
    return {int(k): float(b) for k, b in dict(v).items()}


def _breakers(v: Any) -> list[list[int]]:
    return [[int(t) for t in seq] for seq in (v or ())]


def _check_ge(lo: float) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if value is not None and not value >= lo:
            raise ValueError(f"{attr.name} must be >= {lo}, got {value!r}")

    return check


def _check_unit(open_low: bool) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        ok = (0.0 < value <= 1.0) if open_low else (0.0 <= value <= 1.0)
        if not ok:
            interval = "(0, 1]" if open_low else "[0, 1]"
            raise ValueError(f"{attr.name} must be in {interval}, got {value!r}")

    return check


def _check_positive(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attr.name} must be > 0, got {value!r}")


@attrs.frozen
class SamplingParams:
    """Everything the sampler and the engine's stop logic need from one request.

    `None` means "not set by the request"; `with_defaults` fills such fields from the
    model's generation_config.json. Temperature None or 0 (or top_k == 1) is greedy.
    """

    temperature: float | None = attrs.field(default=None, converter=_opt_float, validator=_check_ge(0.0))
    # top_k <= 0 disables the filter (the llama.cpp / HF convention for "no top-k").
    top_k: int | None = attrs.field(default=None, converter=_opt_int)
    top_p: float | None = attrs.field(default=None, converter=_opt_float, validator=_check_unit(True))
    min_p: float | None = attrs.field(default=None, converter=_opt_float, validator=_check_unit(False))
    presence_penalty: float | None = attrs.field(default=None, converter=_opt_float)
    frequency_penalty: float | None = attrs.field(default=None, converter=_opt_float)
    repetition_penalty: float | None = attrs.field(default=None, converter=_opt_float, validator=_check_positive)
    logit_bias: dict[int, float] | None = attrs.field(default=None, converter=_logit_bias)
    dry_multiplier: float | None = attrs.field(default=None, converter=_opt_float)
    dry_base: float = attrs.field(default=1.75, converter=float)
    dry_allowed_length: int = attrs.field(default=2, converter=int)
    dry_sequence_breakers: list[list[int]] = attrs.field(factory=list, converter=_breakers)
    logprobs: bool = attrs.field(default=False, converter=bool)
    top_logprobs: int | None = attrs.field(default=None, converter=_opt_int, validator=_check_ge(0))
    max_tokens: int | None = attrs.field(default=None, converter=_opt_int)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=lambda v: tuple(int(t) for t in (v or ())))
    stop_strings: tuple[str, ...] = attrs.field(default=(), converter=lambda v: tuple(v or ()))
    ignore_eos: bool = attrs.field(default=False, converter=bool)
    n: int = attrs.field(default=1, converter=int, validator=_check_ge(1))

    @property
    def greedy(self) -> bool:
        return not self.temperature or self.top_k == 1

    @property
    def uses_dry(self) -> bool:
        return bool(self.dry_multiplier)

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty) or bool(self.frequency_penalty) or (
            self.repetition_penalty is not None and self.repetition_penalty != 1.0
        )

    def with_defaults(self, generation_config: Mapping[str, Any] | None) -> SamplingParams:
        """Fill the fields the request left unset from a HF generation_config.json dict.

        This follows transformers' `generate`: temperature, top_k, top_p and min_p are
        sampling knobs, honoured only when the config says `do_sample: true`; without it
        transformers runs greedy search whatever temperature the file lists, so a model
        whose config only carries a temperature still decodes greedily here. When
        `do_sample` is true and the file has no temperature, transformers samples at 1.0,
        and so do we. transformers' implicit top_k=50 (a library default, not something
        the model's file asks for) is deliberately not applied. `repetition_penalty` is
        applied by transformers in greedy search as well, so it is filled regardless of
        `do_sample`. Values the request set explicitly always win.
        """
        cfg = dict(generation_config or {})
        updates: dict[str, Any] = {}

        def fill(name: str, value: Any) -> None:
            if getattr(self, name) is None and value is not None:
                updates[name] = value

        if cfg.get("do_sample"):
            temperature = cfg.get("temperature")
            fill("temperature", 1.0 if temperature is None else temperature)
            fill("top_k", cfg.get("top_k"))
            fill("top_p", cfg.get("top_p"))
            fill("min_p", cfg.get("min_p"))
        fill("repetition_penalty", cfg.get("repetition_penalty"))
        return attrs.evolve(self, **updates) if updates else self


def encode_sequence_breakers(
    encode: Callable[[str], list[int]], breakers: Iterable[str] = DEFAULT_DRY_SEQUENCE_BREAKERS
) -> list[list[int]]:
    """Tokenize DRY breaker strings as they appear mid-text.

    Encoding a breaker alone gives the ids a tokenizer uses at the start of a text
    (a leading-space marker, a BOS), which never occur where the sampler looks for
    breakers; encoding it after a plain letter and dropping that letter's ids gives
    the ids that actually follow other text. `encode` must not add special tokens.
    """
    anchor = encode("a")
    out: list[list[int]] = []
    for text in breakers:
        ids = encode("a" + text)
        common = 0
        while common < min(len(anchor), len(ids)) and anchor[common] == ids[common]:
            common += 1
        tail = ids[common:]
        if tail and tail not in out:
            out.append(tail)
    return out
