"""Settings every stage may read (no torch, no TVM here)."""

from __future__ import annotations

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
    text = str(v).strip().upper().removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    try:
        n = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        n = -1
    if n < 0:
        raise InputError(f"{what} must be a number of bytes, optionally with K, M or G "
                         f"(\"512M\"), not {v!r}")
    return n
