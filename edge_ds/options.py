"""Sampling options, checked in one place for the API, the CLI and the server.

Errors are OptionErrors naming the argument (`top_p`); the CLI renders them with its flags and
the server with its JSON fields.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite real number (NaN and infinities are not sampling parameters)."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    if isinstance(v, numbers.Integral):  # math.isfinite(10**400) raises instead of answering
        return abs(v) <= sys.float_info.max
    return math.isfinite(v)


SEED_MAX = 2**64 - 1  # MLX's random seed is an unsigned 64-bit integer


def require(option: str, ok: bool, requirement: str, value: Any) -> None:
    """Raises OptionError("{option} must be <requirement>, got <value>") unless ok."""
    if not ok:
        raise OptionError(option, f"{{option}} must be {requirement}, got {value}")


def check_filters(temperature: float, top_p: float, top_k: int, min_p: float, min_tokens_to_keep: int) -> None:
    """The token filters' options (sampling.make_sampler's)."""
    require("temperature", is_number(temperature) and temperature >= 0, "a finite number >= 0", temperature)
    require("top_p", is_number(top_p) and 0 < top_p <= 1, "in (0, 1]", top_p)
    require("top_k", is_int(top_k) and top_k >= 0, "an integer >= 0", top_k)
    require("min_p", is_number(min_p) and 0 <= min_p <= 1, "in [0, 1]", min_p)
    require("min_tokens_to_keep", is_int(min_tokens_to_keep) and min_tokens_to_keep >= 1, "an integer >= 1",
            min_tokens_to_keep)


def check_repetition(penalty: float, context_size: int) -> None:
    require("repetition_penalty", is_number(penalty) and penalty > 0, "a finite number > 0", penalty)
    require("repetition_context_size", is_int(context_size) and context_size >= 1, "an integer >= 1",
            context_size)


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are picked and when generation stops; checked when made."""

    max_tokens: int | None = 256  # None: up to the end of the context window
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float | None = None  # None (or 1): off
    repetition_context_size: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            require("max_tokens", is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1",
                    self.max_tokens)
        check_filters(self.temperature, self.top_p, self.top_k, self.min_p, self.min_tokens_to_keep)
        if self.repetition_penalty is not None:
            check_repetition(self.repetition_penalty, self.repetition_context_size)
        require("seed", self.seed is None or (is_int(self.seed) and 0 <= self.seed <= SEED_MAX),
                f"an integer in [0, {SEED_MAX}]", self.seed)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        require("stop", all(isinstance(s, str) and s for s in stop), "non-empty strings", list(stop))
        object.__setattr__(self, "stop", stop)
