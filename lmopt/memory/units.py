"""Byte sizes: parse ``"80GB"`` / ``"24GiB"`` and print bytes readably. GB means 10^9 bytes, GiB 2^30."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
}


def parse_bytes(value: str | int | float, name: str = "device_memory") -> int:
    """``"80GB"`` -> 80e9, ``"24GiB"`` -> 24 x 2^30, ``"1.5 TB"``, or a number of bytes.

    Raises:
        ValueError: naming ``name``, for anything else or a value <= 0.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size like '80GB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a size like '80GB' or a number of bytes, got {type(value).__name__}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{name} must be a size like '80GB', '24GiB' or '512MB', got {value!r}")
    out = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if out <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def format_bytes(n: float, unit: str | None = None) -> str:
    """``112000000000`` -> ``"112.0 GB"`` (decimal units, as GPU memory and the literature quote them)."""
    if unit is not None:
        return f"{n / _UNITS[unit.lower()]:,.1f} {unit}"
    for suffix, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {suffix}"
    return f"{int(n)} B"
