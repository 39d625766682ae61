"""What an entry of the table of elementwise functions holds (see `itdsl.functions`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Opaque:
    """A function sympy keeps unevaluated (a `sympy.Function` named after the entry):
    `formula` gives its value at numbers, `derivative` (S, f, *args) -> its derivative
    (f is the function applied to args); without one, the derivative of `formula`. `sign`
    is "positive" or "nonnegative" where the value has that sign for real arguments;
    `expand`: see below."""

    formula: Callable | None = None
    derivative: Callable | None = None
    sign: str | None = None
    # pair kernels compute the function from `formula` instead of as one unit where a
    # subexpression its derivative shares (gelu's erf(x/√2)) is then computed once per pair
    # (see `itdsl.symbolic.derivatives.expand_formulas`)
    expand: bool = False


@dataclass(frozen=True, kw_only=True)
class Elementwise:
    """One elementwise function (scalars broadcast over vectors); see the module docstring
    for the arguments each form receives."""

    name: str  # in `.it`, in the printed IR and in plan expressions (`P.ew(name, ...)`)
    arity: int
    syntax: str = "call"  # "call" name(a, b) | "infix" a name b | "prefix" | "internal"
    member: str | None = None  # its `ir.Fn` member (default: the name in capitals)
    condition: str | None = None  # "compare" | "logic": a 0/1 Iverson bracket that masks
    #                               the product it is a factor of
    sympy: Callable | None = None  # (S, *args) -> sympy expression (opaque: S.<name>)
    opaque: Opaque | None = None
    sympy_size: int = 1  # how many times the sympy form holds its arguments (size caps)
    partials: Callable | None = None  # instead of sympy's: (P, args, d) -> plan nodes
    fold: Callable | None = None  # on Python floats: constant folding where exact and safe
    cost: int = 1  # arithmetic operations per element (the hoisting's op counts)
    numpy: Callable | None = None
    torch: Callable | None = None
    tvm: Callable | None = None
    let_depth: int = 0  # let-bound values the TVM form nests around its argument
    # (P, a, s) -> the value where the sign of its one argument a is known, s = +1 (a >= 0)
    # or -1 (a <= 0), as an expression without the function: abs(a) = a or -a (a causal mask
    # fixes the sign of x - y, and the score then separates: see strategies/forms.py)
    signed: Callable | None = None
    module: Callable | None = None  # (nn) -> module: allowed as an mlp activation

    @property
    def fn_member(self) -> str:
        return self.member or self.name.upper()


def constant_partials(P, args, d) -> list:
    """Piecewise constant: every partial derivative is 0."""
    return [P.ZERO for _ in args]
