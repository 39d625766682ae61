"""Cached Plans: the symbolic analysis of an operator, so a warm process needs no sympy.

One pickle per operator, `$ITDSL_CACHE_DIR/plans/<key>.pkl`. The key hashes the checked IR's
text, the forced strategy, the code versions (`disk.versions`) and the source of the symbolic
layer, of the tables of functions, domains and rules, and of the IR's classes (which the Plan
pickles): a change to the analysis is never served an old Plan.
An entry that does not unpickle to a Plan is removed and the operator analysed again.

Imports neither torch nor TVM (nor sympy: unpickling a Plan needs only its dataclasses).
"""

from __future__ import annotations

import hashlib
import pickle

from ..symbolic.plan import Plan
from .disk import atomic_write_bytes, plan_file, remove, sources, versions


def plan_key(ir_text: str, strategy: str | None) -> str:
    h = hashlib.sha256()
    h.update(ir_text.encode())
    h.update(f"strategy={strategy};{versions()}".encode())
    for f in sources("symbolic"):
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def load_plan(key: str) -> Plan | None:
    """A cached Plan, or None (an unreadable entry is removed)."""
    path = plan_file(key)
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            plan = pickle.load(f)
        if not isinstance(plan, Plan):
            raise TypeError(f"a {type(plan).__name__}, not a Plan")
        return plan
    except Exception:  # truncated, from another version, not a Plan: analyse again
        remove(path)
        return None


def store_plan(key: str, plan: Plan) -> None:
    path = plan_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # a Plan that does not pickle is analysed again next time, not an error
        return
    atomic_write_bytes(path, data)
