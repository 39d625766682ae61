"""The elementwise functions: one entry each, read by every stage.

An entry (`Elementwise`) holds everything the compiler knows about one function: its name
and arity, how it is written, its sympy form and derivative, its constant folding and
cost, and its numpy, torch and TVM forms. The families live in the modules beside this one
(`arithmetic`, `elementary`, `activations`, `conditions`); `FUNCTIONS` is all of them, by
name. Adding a function is adding an entry to one of those modules (plus its tests and
docs/language.md).

No stage's library is imported here: the core (frontend, symbolic) imports neither torch
nor TVM, and a Plan loaded from the cache needs no sympy. Each form therefore receives
its backend as its first argument, passed by the stage that calls it:

    sympy    (S, *args)      S: sympy's namespace plus the Iverson brackets `Le0`, `Lt0`,
                             `Eq0` and every opaque function by name (symbolic/tosympy.py)
    partials (P, args, d)    P: the plan-expression module (symbolic/pexpr.py), args: the
                             argument nodes, d(): the partials sympy derives
    numpy    (np, *args)     recognition's numeric check at random points
    torch    (T, *args)      T: the torch module (runtime/reference.py, runtime/plan_eval.py)
    tvm      (b, *args)      b: the kernel builder (lowering/pair.py `PairBuilder`), which
                             holds the careful special-value code (fast exp, isnan from the
                             bits, selects that keep a NaN) and exposes `te` and `tirx`
    module   (nn)            the `nn.Module` of an mlp's `act = name`
"""

from __future__ import annotations

from collections.abc import Callable

from .entry import Elementwise, Opaque, constant_partials


def _table() -> dict[str, Elementwise]:
    from . import activations, arithmetic, conditions, elementary
    table: dict[str, Elementwise] = {}
    for family in (arithmetic, elementary, activations, conditions):
        for f in family.FUNCTIONS:
            if f.name in table:
                raise ValueError(f"elementwise function `{f.name}` is defined twice")
            table[f.name] = f
    return table


FUNCTIONS: dict[str, Elementwise] = _table()

# mlp activations that are not functions of the language: (nn) -> module, (P, h) -> plan
MLP_ONLY: dict[str, tuple[Callable, Callable]] = {
    "silu": (lambda nn: nn.SiLU(), lambda P, h: P.mul(h, P.ew("sigmoid", h))),
    "identity": (lambda nn: nn.Identity(), lambda P, h: h),
}
ACTIVATIONS: tuple[str, ...] = (*(f.name for f in FUNCTIONS.values() if f.module), *MLP_ONLY)

__all__ = ["ACTIVATIONS", "FUNCTIONS", "MLP_ONLY", "Elementwise", "Opaque", "constant_partials"]
