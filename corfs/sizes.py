"""Human sizes and rates: '50M', '1.5G', '64k', '0'."""

from __future__ import annotations

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'64k' -> 65536. Binary units; an optional trailing 'b', 'ib' or '/s' is accepted."""
    value = text.strip().lower().removesuffix("/s").removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        result = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 0, 64k, 50M, 2G)") from None
    if result != result or result in (float("inf"), float("-inf")):  # nan, inf
        raise ValueError(f"not a size: {text!r} (examples: 0, 64k, 50M, 2G)")
    if result < 0:
        raise ValueError(f"a size must not be negative: {text!r}")
    if 0 < result < 1:  # int() made it 0: for --bandwidth, "unlimited"
        raise ValueError(f"a size below one byte: {text!r}")
    return int(result)


def format_size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        shown = round(abs(count)) if unit == "B" else round(abs(count), 1)
        if shown < 1024 or unit == "TiB":  # as shown: 1 MiB - 1 B is 1.0 MiB, not 1024.0 KiB
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
