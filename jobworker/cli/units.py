"""Sizes and CPU counts as people type them (docker's conventions)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["parse_cpus", "parse_size"]

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``512``, ``64k``, ``256M``, ``1.5G``, ``2GiB`` (units are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size: use a number with an optional k, M, G or T")
    value = Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
    return int(value)


def parse_cpus(text: str) -> int:
    """Thousandths of a CPU from a CPU count such as ``0.5`` or ``2``."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number of CPUs, such as 0.5 or 2") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"the number of CPUs must be positive, not {text!r}")
    return int(value * 1000)
