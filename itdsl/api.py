"""The public API: compile `.it` text into operators.

The pipeline is one linear function: `compile_source` parses and checks; `Program.plan`
runs the symbolic analysis (or loads its Plan from the on-disk cache); `Program[name]` builds
the runtime module, which lowers and compiles its kernels on first use. torch and TVM are
imported only when operators are built, so `itdsl check` stays light.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ItdslError
from .frontend import check, ir, parse, parse_file

TARGETS = ("reference", "cpu", "cuda")  # or None: compiled, for the device of the tensors


class Program:
    """The operators of one `.it` file, built for one target."""

    def __init__(self, checked: ir.Program, target: str | None, strategy: str | None):
        self.ir = checked
        self.target = target
        self.strategy = strategy
        self._plans: dict[str, object] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return self.ir.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def _op_ir(self, name: str) -> ir.Operator:
        try:
            return self.ir[name]
        except KeyError:
            from .errors import did_you_mean
            raise ItdslError(f"no operator named `{name}`; this program has "
                             f"{', '.join(f'`{n}`' for n in self.names)}",
                             hint=did_you_mean(name, self.names)) from None

    def plan(self, name: str):
        """The Plan of operator `name`: analysed once, on first use, and kept in the on-disk
        cache (so a new process skips the symbolic analysis, and sympy)."""
        op = self._op_ir(name)
        if name not in self._plans:
            from .cache import plans
            from .frontend.printer import format_ir_operator
            key = plans.plan_key(format_ir_operator(op), self.strategy)
            plan = plans.load_plan(key)
            if plan is None:
                from .symbolic import analyse
                plan = analyse(op, self.strategy)
                plans.store_plan(key, plan)
            self._plans[name] = plan
        return self._plans[name]

    def __getitem__(self, name: str):
        """A fresh `torch.nn.Module` for operator `name` (it holds its own params)."""
        op = self._op_ir(name)
        if self.target == "reference":
            from .runtime.reference import ReferenceOperator
            return ReferenceOperator(op, strategy=lambda: self.plan(name).strategy)
        from .runtime.module import CompiledOperator
        return CompiledOperator(self.plan(name), self.target)

    def explain(self, name: str) -> str:
        """What the compiler made of operator `name`: strategy, hoisting, gradients."""
        from .symbolic.explain import explain
        plan = self.plan(name)
        return explain(plan, plan.seconds)

    def source(self, name: str, target: str = "cuda", arch: str = "sm_80") -> str:
        """Generated code of operator `name`: "cuda" (CUDA C of every kernel, forward and
        backward, for `arch`) or "tir" (the scheduled TVM script, for this program's target
        or the CPU)."""
        from .lowering import kernel_sources
        if target not in ("cuda", "tir"):
            raise ItdslError(f"unknown source kind `{target}`; choose \"cuda\" or \"tir\"")
        plan = self.plan(name)
        tir_target = "cuda" if self.target == "cuda" else "cpu"  # (None: the CPU's)
        return kernel_sources(plan, target, arch=arch, tir_target=tir_target)


def _check_options(target: str | None, strategy: str | None) -> None:
    if target is not None and target not in TARGETS:
        raise ItdslError(f"unknown target `{target}`; choose one of {', '.join(TARGETS)}")
    from .symbolic.strategies import NAMES
    if strategy is not None and strategy not in NAMES:
        raise ItdslError(f"unknown strategy `{strategy}`; choose one of {', '.join(NAMES)}")


def compile_source(source: str, target: str | None = None, strategy: str | None = None,
                   filename: str = "<string>") -> Program:
    """Compile `.it` text. With no `target` the operators are compiled for the device of the
    tensors each call passes (CPU kernels now, CUDA kernels for tensors on a GPU, built on
    first use per device and dtype); "cpu" or "cuda" forces one, "reference" gives the
    executable semantics (every pair materialised; any derivative). `strategy` forces one."""
    _check_options(target, strategy)
    return Program(check(parse(source, filename)), target, strategy)


def compile_file(path: str | Path, target: str | None = None,
                 strategy: str | None = None) -> Program:
    """Compile a `.it` file; see `compile_source`."""
    _check_options(target, strategy)
    return Program(check(parse_file(path)), target, strategy)
