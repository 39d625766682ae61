"""Settings every stage may read (no torch, no TVM here)."""

from __future__ import annotations

import math
import os

from .errors import InputError

DEFAULT_BUDGET = "256M"
_budget: int | None = None


def memory_budget() -> int:
    """The bytes a strategy may materialise per call (a matmul's sampled n×m matrix) before
    the tiled kernels run the call instead: `itdsl.set_memory_budget`, else
    $ITDSL_MEMORY_BUDGET (bytes, or with a K/M/G suffix), else 256 MiB."""
    if _budget is not None:
        return _budget
    return parse_bytes(os.environ.get("ITDSL_MEMORY_BUDGET", DEFAULT_BUDGET),
                       "$ITDSL_MEMORY_BUDGET")


def set_memory_budget(nbytes: int | str | None) -> None:
    """Set the memory budget of the strategies: a number of bytes, or a string such as
    "512M"; None restores the default ($ITDSL_MEMORY_BUDGET, else 256 MiB). `explain`
    states each strategy's rule."""
    global _budget
    _budget = None if nbytes is None else parse_bytes(nbytes, "the memory budget")


def parse_bytes(v: int | str, what: str) -> int:
    """Bytes from an int, or a string with an optional K, M or G (KB, KiB, …: powers of 1024)."""
    text = str(v).strip().upper()
    for suffix in ("IB", "B"):
        text = text.removesuffix(suffix)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    try:
        x = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        x = math.nan
    if isinstance(v, bool) or not (math.isfinite(x) and x >= 0) or (scale == 1 and x != int(x)):
        raise InputError(f"{what} must be a whole number of bytes >= 0, optionally with K, M "
                         f"or G (\"512M\"), not {v!r}")
    return int(x)
