"""Lowering: Plans -> TVM. The only package that imports TVM (lazily, on first compile).

`pair_groups` cuts a program's pair steps into kernels (steps of one kind over the
same two sides that can run together: on the CPU in one sweep whichever side each sum is
per point of); `compile_pair` builds one kernel for a target.
Per-point, per-call and total steps are not compiled: the runtime computes them with
torch (they are O(n) work, and torch's GEMMs do the MLP layers best).
"""

from __future__ import annotations

import os

from ..errors import LoweringError
from .spec import Group, PairSpec, pair_groups, shift_names, spec_of

CUDA_ARCHS = ("sm_80", "sm_90")


def cpu_target():
    import tvm
    cpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})


def cuda_target(arch: str = "sm_80"):
    import tvm
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=cpu_target())


def schedule_kernel(group_spec, dtype: str, target: str):
    """The scheduled IRModule of one pair kernel for `target` ("cpu" or "cuda")."""
    from .pair import build_pair_func
    from .schedule import schedule_cpu, schedule_cuda
    func, stages, scalar_only = build_pair_func(group_spec, dtype, fast_exp=(target == "cpu"))
    if target == "cuda":
        return schedule_cuda(func, group_spec, stages).mod
    mod = schedule_cpu(func, group_spec, stages, scalar_only).mod
    if group_spec.fused:  # see compile_module
        mod = mod.with_attr(NO_CSE, True)
    return mod


# TVM's common-subexpression elimination (TIR) breaks some fused kernels ("variable cse_v33
# has been used before definition": brackets and min/max of a pair's values summed per row
# and per column); LLVM eliminates common subexpressions itself
NO_CSE = "itdsl_no_cse"


def compile_module(mod, target: str, arch: str = "sm_80"):
    import tvm
    try:
        with tvm.transform.PassContext(config={"tirx.disable_cse_tir": bool(
                mod.attrs is not None and NO_CSE in mod.attrs)}):
            return tvm.compile(mod, target=cpu_target() if target == "cpu" else cuda_target(arch))
    except Exception as e:
        first = (str(e).strip().splitlines() or ["(no message)"])[0][:300]
        raise LoweringError(f"TVM could not compile a kernel for {target}: "
                            f"{type(e).__name__}: {first}") from e


def kernel_codes(plan, kind: str, arch: str = "sm_80", tir_target: str = "cpu",
                 dtype: str = "float32"):
    """(title, code) of every kernel of a Plan: CUDA C ("cuda") or TVM script ("tir")."""
    for phase, prog in (("forward", plan.forward), ("backward", plan.backward)):
        target = "cuda" if kind == "cuda" else tir_target
        for group in pair_groups(prog, shift_names(plan), target):
            spec = spec_of(group, target)
            mod = schedule_kernel(spec, dtype, target)
            names = ", ".join(st.name for st in group.steps)
            cols = ", ".join(st.name for st in spec.col_steps)
            title = (f"{plan.op.name}: {phase} kernel for {names} ({group.kind} over "
                     f"{group.over}, per point of {group.side}"
                     + (f"; {cols} over {group.side}, per point of {group.over}" if cols else "")
                     + ")")
            if kind == "tir":
                yield title, mod.script()
                continue
            exe = compile_module(mod, "cuda", arch)
            if not exe.mod.imports:
                raise LoweringError(f"no CUDA kernel was generated for {names}")
            yield title, exe.mod.imports[0].inspect_source()


def kernel_sources(plan, kind: str, arch: str = "sm_80", tir_target: str = "cpu",
                   dtype: str = "float32") -> str:
    """The generated code of every kernel of a Plan, one after the other."""
    mark = "#" if kind == "tir" else "//"
    return "\n\n".join(f"{mark} {title}\n{code}" for title, code in
                        kernel_codes(plan, kind, arch, tir_target, dtype))


__all__ = ["kernel_codes", "kernel_sources", "Group", "PairSpec", "pair_groups", "spec_of",
           "schedule_kernel", "compile_module",
           "cpu_target", "cuda_target", "CUDA_ARCHS"]
