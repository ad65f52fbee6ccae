"""Sizes and counts as people write them on the command line and in plans, and bytes printed back
for people: one set of units for every flag (``--max-memory``, ``--max-shard-size``, ``--block-size``)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses), '2GiB' -> 2·2³⁰, 1000 -> 1000."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not value < 2**62:
        raise ValueError(f"not a size: {text!r} is too large")
    return int(value)


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def parse_count(text: str | int) -> int:
    """mergekit's counts: '1B' -> 10⁹, '500M' -> 5·10⁸, '20k' -> 20 000, 1000 -> 1000."""
    if isinstance(text, int):
        return text
    m = _COUNT.match(str(text))
    if not m:
        raise ValueError(f"not a count: {text!r} (examples: 5B, 500M, 20k, 1000000)")
    return int(float(m.group(1)) * _COUNT_UNITS[m.group(2).lower()])


def human_size(n: float) -> str:
    """Bytes for people: GB from 0.1 GB up, else MB (decimal units, as parse_size reads them)."""
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
