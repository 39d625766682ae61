"""The kernel cache: one shared library per compiled kernel, in `$ITDSL_CACHE_DIR`.

Key: a SHA-256 of the kernel's canonical text (its pair steps, leaves, tiles: see
`kernel_key`), the target, the dtype, and the itdsl and TVM versions. A hit is loaded
with `tvm_ffi.load_module` alone (no `import tvm`, which costs seconds). Writes are
atomic (`itdsl/cache/disk.py`), so two processes compiling the same kernel at once both
succeed; every library has a checksum beside it, and an entry that is truncated or
corrupt is detected, removed and rebuilt. Cached Plans are not runtime business: they
live in `itdsl/cache/plans.py`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..cache.disk import atomic_write_bytes, digest, kernel_files, private_temp, remove, versions
from ..symbolic.pexpr import Node, toposort


def canonical(roots: list[Node]) -> str:
    """An exact text of an expression DAG: one line per node, children by number."""
    ids: dict[Node, int] = {}
    lines = []
    for n in toposort(roots):
        ids[n] = len(ids)
        attrs = ",".join(repr(a) for a in n.attrs)
        lines.append(f"{n.op}({attrs})[{','.join(str(ids[a]) for a in n.args)}]:{n.shape}")
    lines.append("roots:" + ",".join(str(ids[r]) for r in roots))
    return "\n".join(lines)


def kernel_key(spec, dtype: str, target: str) -> str:
    roots = [st.expr for st in spec.steps] + [st.mask for st in spec.steps if st.mask is not None]
    text = "\n".join([
        f"kind={spec.kind};rows={spec.row_side};cols={spec.col_side}",
        f"tiles={spec.tile_rows}x{spec.tile_cols};widths={spec.widths}",
        "sides=" + ",".join(str(st.side) for st in spec.steps),
        canonical(roots),
        "staged:" + canonical(spec.staged),
        "leaves:" + ";".join(f"{leaf.role}/{leaf.soa}/{leaf.transposed}/{leaf.shape}"
                             for leaf in spec.leaves),
        f"dtype={dtype};target={target};{versions()}",
    ])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_RUNTIME_LOADED = False


def _load_tvm_runtime() -> None:
    """Load TVM's C++ runtime library (parallel launch, workspaces) without `import tvm`:
    a cached kernel needs it, and importing the Python package would cost seconds."""
    global _RUNTIME_LOADED
    if _RUNTIME_LOADED:
        return
    import ctypes
    import importlib.util

    import tvm_ffi  # noqa: F401 - loads libtvm_ffi.so, which the runtime links against
    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:  # pragma: no cover - tvm is a dependency
        raise OSError("the apache-tvm package is not installed")
    lib = Path(spec.origin).parent / "lib" / "libtvm_runtime.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    _RUNTIME_LOADED = True


def load(key: str):
    """The cached kernel function for `key`, or None (a bad entry is removed)."""
    lib, check = kernel_files(key)
    if not (lib.exists() and check.exists()):
        return None
    _load_tvm_runtime()
    try:
        if check.read_text().strip() != digest(lib):
            raise ValueError("checksum mismatch")
        import tvm_ffi
        return tvm_ffi.load_module(str(lib))["main"]
    except Exception:  # a truncated or corrupt entry: remove it, rebuild
        remove(lib, check)
        return None


def store(key: str, executable) -> None:
    """Export a compiled TVM executable under `key` (atomically)."""
    lib, check = kernel_files(key)
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_temp(lib, suffix=".so")  # export_library picks the format by the suffix
    try:
        executable.export_library(str(tmp))
        checksum = digest(tmp)
        os.replace(tmp, lib)
    finally:
        remove(tmp)  # gone already after the replace
    atomic_write_bytes(check, checksum.encode())
