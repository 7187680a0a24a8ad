"""The expert budget: bytes of routed experts allowed to stay resident, from a user's spelling."""

from __future__ import annotations

import re

from ..errors import OptionError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_budget(value: int | str, routed_bytes: int, what: str = "expert_budget") -> int:
    """Bytes for `value`: an int (bytes), a size string ("2GB", "512MiB", "1.5G") or a share of
    the model's routed-expert bytes ("25%"). Budgets above `routed_bytes` are clamped to it."""
    if isinstance(value, bool):
        raise OptionError(what, f"{{option}}: expected bytes, a size like '2GB' or a share like '25%', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1])
        except ValueError:
            raise OptionError(what, f"{{option}}: {value!r} is not a percentage like '25%'") from None
        if not 0 < share <= 100:
            raise OptionError(what, f"{{option}}: {value!r} must be a share in (0%, 100%]")
        n = int(routed_bytes * share / 100)
    elif isinstance(value, str) and (m := _SIZE.match(value)) and m.group(2).lower() in _UNITS:
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise OptionError(what, f"{{option}}: expected bytes, a size like '2GB'/'512MiB' or a share like '25%', "
                                f"got {value!r}")
    if n <= 0:
        raise OptionError(what, f"{{option}}: {value!r} is not a positive size")
    return min(n, routed_bytes)


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
