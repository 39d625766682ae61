"""Lowering: Plans -> TVM. The only package that imports TVM (lazily, on first compile).

`pair_groups` cuts a program's pair steps into kernels (steps of one kind over the
same sides that can run together); `compile_pair` builds one kernel for a target.
Per-point, per-call and total steps are not compiled: the runtime computes them with
torch (they are O(n) work, and torch's GEMMs do the MLP layers best).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import LoweringError
from ..symbolic.plan import Program, Step

TILE_ROWS = 4
TILE_COLS = 64
CUDA_ARCHS = ("sm_80", "sm_90")


@dataclass
class Group:
    """Pair steps computed by one kernel, run at the position of the first."""

    kind: str
    side: str
    over: str
    steps: list[Step]

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.steps)


def _refs(st: Step) -> set[str]:
    from ..symbolic.pexpr import toposort
    roots = [st.expr] + ([st.mask] if st.mask is not None else [])
    return {n.attrs[0] for n in toposort(roots) if n.op in ("ref", "cot")}


def pair_groups(prog: Program) -> list[Group]:
    """Group pair steps: same kind and sides, and every input ready where the group runs."""
    groups: list[Group] = []
    open_group: Group | None = None
    produced_since: set[str] = set()
    for st in prog.steps:
        if st.kind in ("sum", "max"):
            if (open_group is not None and (st.kind, st.side, st.over) ==
                    (open_group.kind, open_group.side, open_group.over)
                    and not (_refs(st) & produced_since)):
                open_group.steps.append(st)
                produced_since.add(st.name)
                continue
            open_group = Group(st.kind, st.side, st.over, [st])
            groups.append(open_group)
            produced_since = {st.name}
        else:
            produced_since.add(st.name)
    return groups


def spec_of(group: Group, target: str = "cpu"):
    """The kernel spec of a group: tiles of TI rows (threads of a block on a GPU) by TJ
    columns."""
    from .pair import PairSpec
    from .schedule import CUDA_THREADS
    widths = [_width(s.shape) for s in group.steps]
    cols = TILE_COLS if max(widths) <= 256 else 16
    rows = TILE_ROWS if target == "cpu" else CUDA_THREADS
    return PairSpec(kind=group.kind, row_side=group.side, col_side=group.over,
                    steps=group.steps, widths=widths, tile_rows=rows, tile_cols=cols)


def _width(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def cpu_target():
    import tvm
    cpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})


def cuda_target(arch: str = "sm_80"):
    import tvm
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=cpu_target())


def schedule(group_spec, dtype: str, target: str):
    """The scheduled IRModule of one pair kernel for `target` ("cpu" or "cuda")."""
    from .pair import build_pair_func
    from .schedule import schedule_cpu, schedule_cuda
    func, stages = build_pair_func(group_spec, dtype, fast_exp=(target == "cpu"))
    if target == "cpu":
        return schedule_cpu(func, group_spec, stages).mod
    return schedule_cuda(func, group_spec, stages).mod


def compile_module(mod, target: str, arch: str = "sm_80"):
    import tvm
    try:
        return tvm.compile(mod, target=cpu_target() if target == "cpu" else cuda_target(arch))
    except Exception as e:  # noqa: BLE001 - TVM raises many kinds; say which kernel failed
        raise LoweringError(f"TVM could not compile a kernel for {target}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e


__all__ = ["Group", "pair_groups", "spec_of", "schedule", "compile_module", "cpu_target",
           "cuda_target", "CUDA_ARCHS"]
