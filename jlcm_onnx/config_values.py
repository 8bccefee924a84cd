"""Checks of single config values: sizes given as text, integers and numbers in range."""

from __future__ import annotations

import re
from typing import Any

from jlcm_onnx.errors import ConfigError


def parse_size(value: int | str, field_name: str = "target_size") -> int:
    """Bytes from an int or a text such as ``"40MB"``, ``"40 mb"``, ``"1.5GiB"`` (KB/MB/GB are powers of 1000,
    KiB/MiB/GiB of 1024; units in any case)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    pattern = r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*"
    match = re.fullmatch(pattern, value, flags=re.IGNORECASE) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(field_name, value, "a positive size such as 40000000, '40MB' or '1.5GiB'")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** "BKMGT".index(unit[0]))


def check_positive(config: Any, name: str, above: float) -> None:
    value = getattr(config, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > above:
        raise ConfigError(name, value, f"a number > {above:g}")


def check_int(config: Any, name: str, low: int, high: int | None) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        expected = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise ConfigError(name, value, expected)
