"""Settings every stage may read (no torch, no TVM here)."""

from __future__ import annotations

import contextlib
import math
import os

from .errors import InputError

DEFAULT_BUDGET = "256M"
_budget: int | None = None
_small_pairs: int | None = None


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


def small_pairs() -> int | None:
    """The most pairs (batch entries × the points of every side, e.g. B·n·m) a call may
    have and still run materialised in torch by the Plan evaluator instead of the compiled
    kernels, where the user fixed it: `itdsl.set_small_pairs`, else $ITDSL_SMALL_PAIRS
    (0: always the kernels). None: each operator's cost model decides (its crossover for
    forward and for training calls, which `explain` states; `symbolic.costmodel`)."""
    if _small_pairs is not None:
        return _small_pairs
    env = os.environ.get("ITDSL_SMALL_PAIRS", "").strip()
    return _count(env, "$ITDSL_SMALL_PAIRS") if env else None


def set_small_pairs(n: int | None) -> None:
    """Calls with at most `n` pairs run materialised in torch, larger ones in the kernels
    (see `small_pairs`); 0 sends every call to the compiled kernels; None restores the
    default ($ITDSL_SMALL_PAIRS, else the cost model of each operator)."""
    global _small_pairs
    _small_pairs = None if n is None else _count(n, "the small-call pair count")


@contextlib.contextmanager
def small_pairs_set(n: int | None):
    """`set_small_pairs(n)` inside the block; the setting before it restored after."""
    global _small_pairs
    saved = _small_pairs
    set_small_pairs(n)
    try:
        yield
    finally:
        _small_pairs = saved


_progress: bool | None = None


def progress() -> bool:
    """Whether a compile that takes more than a second prints a progress line on stderr:
    `itdsl.set_progress`, else $ITDSL_PROGRESS ("0" silences it), else on."""
    if _progress is not None:
        return _progress
    return os.environ.get("ITDSL_PROGRESS", "1").strip().lower() not in ("0", "false", "no",
                                                                          "off")


def set_progress(on: bool | None) -> None:
    """Print (True) or not (False) a progress line on compiles that take more than a
    second; None restores the default ($ITDSL_PROGRESS, else on)."""
    global _progress
    if on is not None and not isinstance(on, bool):
        raise InputError(f"set_progress takes True, False or None, not {on!r}")
    _progress = on


def _count(v: int | str, what: str) -> int:
    try:
        n = int(str(v).strip())
    except ValueError:
        n = -1
    if isinstance(v, bool) or isinstance(v, float) or n < 0:
        raise InputError(f"{what} must be a whole number >= 0 (0: always the compiled "
                         f"kernels), not {v!r}")
    return n


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


def tune_malloc(retain: int | str = "256M") -> bool:
    """Keep freed memory in the process instead of returning it to the kernel on every free
    (glibc's malloc, Linux): torch's CPU tensors come from malloc, and a call that makes
    temporaries of a few MiB (an FFT, a convolution) otherwise page-faults them in again on
    every call, which can cost as much as the arithmetic. Up to `retain` bytes stay mapped
    after a free (allocations of 32 MiB or more are still returned at once). Process-wide
    and never undone, as an `LD_PRELOAD` of jemalloc or tcmalloc (PyTorch's CPU tuning
    guide) is: call it in a program that runs many calls, not in a library. Returns whether
    the malloc here took the settings (False elsewhere: nothing is changed)."""
    import ctypes
    import ctypes.util
    nbytes = parse_bytes(retain, "the memory retained")
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    return all(mallopt(opt, min(v, 2**31 - 1)) == 1
               for opt, v in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, nbytes),
                              (m_top_pad, min(16 << 20, nbytes))))
