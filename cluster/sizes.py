"""Human sizes on the command line and in config files: 512M, 2G, 1.5GiB, 0."""

from __future__ import annotations

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = s[-1] if s and s[-1] in _UNITS else ""
    number = s[:-1] if unit else s
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 0, 4096, 512M, 2G)") from None
    if value < 0:
        raise ValueError(f"size must be >= 0, got {text!r}")
    return int(value * _UNITS[unit])
