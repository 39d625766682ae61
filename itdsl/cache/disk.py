"""Where the compile cache lives and how its files are written, shared by both caches.

Writes are atomic (a private temporary file in the same directory, then `os.replace`), so
two processes writing the same entry at once both succeed and a reader never sees half a
file. `versions()` names the code that produced an entry, for the keys.

Location: `$ITDSL_CACHE_DIR`, else `$XDG_CACHE_HOME/itdsl`, else `~/.cache/itdsl`.
No torch, no TVM here (TVM's version is read from the package metadata).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import ItdslError

_ROOT = Path(__file__).parent.parent  # the itdsl package


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


# ---- the entries: where each kind lives (the one place that knows the layout) -----------------


def kernel_files(key: str) -> tuple[Path, Path]:
    """A compiled kernel's shared library and its checksum."""
    d = cache_dir()
    return d / f"{key}.so", d / f"{key}.sha256"


def plan_file(key: str) -> Path:
    """A pickled Plan."""
    return cache_dir() / "plans" / f"{key}.pkl"


def contents() -> dict[str, list[Path]]:
    """The cache's files by kind: "kernels" (libraries and checksums), "plans", and
    "partial" (temporary files of writes in progress or interrupted)."""
    d = cache_dir()
    if not d.is_dir():
        return {"kernels": [], "plans": [], "partial": []}
    hidden = [p for p in (*d.glob(".*"), *d.glob("plans/.*")) if p.is_file()]
    return {"kernels": sorted([*d.glob("*.so"), *d.glob("*.sha256")]),
            "plans": sorted(d.glob("plans/*.pkl")), "partial": sorted(hidden)}


def clear() -> dict[str, tuple[int, int]]:
    """Remove every entry of the cache: {kind: (files, bytes)} removed. Files that are not
    itdsl's are left alone (the directory may be shared)."""
    out = {}
    for kind, paths in contents().items():
        size = 0
        for p in paths:
            try:
                size += p.stat().st_size
            except OSError:
                continue
        remove(*paths)
        out[kind] = (len(paths), size)
    return out


# ---- the code an entry was made by --------------------------------------------------------------


def sources(stage: str) -> list[Path]:
    """The source files of a stage (`"symbolic"`, `"lowering"`, with their subpackages such
    as `symbolic/strategies/`), with the tables of elementwise functions (whose sympy,
    derivative and TVM forms the symbolic layer and the lowering read) and of domain kinds
    and quadratures (what the Plan builder asks of a rule), and with the IR's definitions
    (`frontend/ir.py`, `frontend/ast.py`: a Plan pickles the operator's IR, so a change to
    its classes must not be served an old one)."""
    return sorted((_ROOT / stage).rglob("*.py")) + [
        f for table in ("functions", "domains") for f in sorted((_ROOT / table).glob("*.py"))
    ] + [_ROOT / "frontend" / "ir.py", _ROOT / "frontend" / "ast.py"]


_VERSIONS: str | None = None


def versions() -> str:
    """itdsl's and TVM's versions, and a digest of the lowering's source (and of the
    functions' TVM forms): a change to the code generator must never be served an old
    kernel."""
    global _VERSIONS
    if _VERSIONS is None:
        from .. import __version__  # here, not at the top: itdsl/__init__ imports the API
        try:
            tvm_v = version("apache-tvm")
        except PackageNotFoundError:  # pragma: no cover
            tvm_v = "none"
        h = hashlib.sha256()
        for f in sources("lowering"):
            h.update(f.read_bytes())
        _VERSIONS = f"itdsl={__version__};tvm={tvm_v};lowering={h.hexdigest()[:16]}"
    return _VERSIONS


# ---- files --------------------------------------------------------------------------------------


def digest(path: Path) -> str:
    """The SHA-256 of a file (the checksum kept beside a cached library)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def private_temp(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh, closed, empty file beside `path`, hidden (a leading dot), to be written and then
    moved onto `path` with `os.replace` (atomic within one directory)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = private_temp(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        remove(tmp)  # gone already after the replace


def remove(*paths: Path) -> None:
    """Delete cache files, ignoring those another process already removed."""
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass
