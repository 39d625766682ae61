"""The on-disk compile cache: one shared library per compiled kernel.

Key: a SHA-256 of the kernel's canonical text (its pair steps, leaves, tiles: see
`kernel_key`), the target, the dtype, and the itdsl and TVM versions. A hit is loaded
with `tvm_ffi.load_module` alone (no `import tvm`, which costs seconds). Writes are
atomic (a private temporary file, then `os.replace`), so two processes compiling the
same kernel at once both succeed; every library has a checksum beside it, and an entry
that is truncated or corrupt is detected, removed and rebuilt.

Location: `$ITDSL_CACHE_DIR`, else `$XDG_CACHE_HOME/itdsl`, else `~/.cache/itdsl`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import ItdslError
from ..symbolic.pexpr import Node, toposort
from ..symbolic.plan import Plan


def cache_dir() -> Path:
    env = os.environ.get("ITDSL_CACHE_DIR")
    if env:
        path, how = Path(env), f"ITDSL_CACHE_DIR={env}"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        path, how = Path(base) / "itdsl", f"the cache directory {Path(base) / 'itdsl'}"
    for p in (path, *path.parents):  # the first part that exists must be a directory
        if p.exists():
            if not p.is_dir():
                raise ItdslError(f"{how} cannot hold the compile cache: {p} is a file, not a "
                                 "directory", hint="point ITDSL_CACHE_DIR at a directory (it "
                                 "is made if missing)")
            break
    return path


_VERSIONS: str | None = None


def _sources(stage: str) -> list[Path]:
    """The source files of a stage, with the tables of elementwise functions (whose sympy,
    derivative and TVM forms the symbolic layer and the lowering read) and of domain kinds
    and quadratures (what the Plan builder asks of a rule)."""
    root = Path(__file__).parent.parent
    return sorted((root / stage).glob("*.py")) + [
        f for table in ("functions", "domains") for f in sorted((root / table).glob("*.py"))]


def _versions() -> str:
    """itdsl's and TVM's versions, and a digest of the lowering's source (and of the
    functions' TVM forms): a change to the code generator must never be served an old
    kernel."""
    global _VERSIONS
    if _VERSIONS is None:
        from .. import __version__
        try:
            tvm_v = version("apache-tvm")
        except PackageNotFoundError:  # pragma: no cover
            tvm_v = "none"
        h = hashlib.sha256()
        for f in _sources("lowering"):
            h.update(f.read_bytes())
        _VERSIONS = f"itdsl={__version__};tvm={tvm_v};lowering={h.hexdigest()[:16]}"
    return _VERSIONS


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
        canonical(roots),
        "staged:" + canonical(spec.staged),
        "leaves:" + ";".join(f"{leaf.role}/{leaf.soa}/{leaf.transposed}/{leaf.shape}"
                             for leaf in spec.leaves),
        f"dtype={dtype};target={target};{_versions()}",
    ])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def _remove(*paths: Path) -> None:
    """Delete cache files, ignoring those another process already removed."""
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass


def load(key: str):
    """The cached kernel function for `key`, or None (a bad entry is removed)."""
    d = cache_dir()
    lib, check = d / f"{key}.so", d / f"{key}.sha256"
    if not (lib.exists() and check.exists()):
        return None
    _load_tvm_runtime()
    try:
        if check.read_text().strip() != _digest(lib):
            raise ValueError("checksum mismatch")
        import tvm_ffi
        return tvm_ffi.load_module(str(lib))["main"]
    except Exception:  # a truncated or corrupt entry: remove it, rebuild
        _remove(lib, check)
        return None


def store(key: str, executable) -> None:
    """Export a compiled TVM executable under `key` (atomically)."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{key}.", suffix=".so")
    os.close(fd)
    try:
        executable.export_library(tmp)
        digest = _digest(Path(tmp))
        os.replace(tmp, d / f"{key}.so")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _atomic_write_bytes(d / f"{key}.sha256", digest.encode())


# ---- Plans: the analysis of an operator, so a warm process needs no sympy ---------------------


def plan_key(ir_text: str, strategy: str | None) -> str:
    h = hashlib.sha256()
    h.update(ir_text.encode())
    h.update(f"strategy={strategy};{_versions()}".encode())
    for f in _sources("symbolic"):
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def load_plan(key: str):
    """A cached Plan, or None (an unreadable entry is removed)."""
    import pickle
    path = cache_dir() / "plans" / f"{key}.pkl"
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            plan = pickle.load(f)
        if not isinstance(plan, Plan):
            raise TypeError(f"a {type(plan).__name__}, not a Plan")
        return plan
    except Exception:  # truncated, from another version, not a Plan: analyse again
        _remove(path)
        return None


def store_plan(key: str, plan) -> None:
    import pickle
    d = cache_dir() / "plans"
    d.mkdir(parents=True, exist_ok=True)
    try:
        data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return
    _atomic_write_bytes(d / f"{key}.pkl", data)
