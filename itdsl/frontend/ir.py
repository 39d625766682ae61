"""The checked IR: what the checker proves about a program, in one screen.

    Program   := Operator*
    Operator  := domains inputs params kernels output
    Domain    := points(D) | grid(lo, hi) | index
    Output    := name (var: Domain) = Expr                      (width: None = R, C = R^C)
    Expr      := Const | Coord(var) | FieldAt(field, var) | ParamRef(param)
               | Op(fn, args)              elementwise, scalars broadcast over vectors
               | Reduce(fn, args)          dot / norm / sqnorm / sum -> scalar
               | Component(arg, index)
               | MlpCall(param, args)      args concatenated
               | SplineCall(param, args)
               | Integral(var, domain, body, quad)
    Quad      := rule [weights field] [n nodes] [samples, importance Expr]   (itdsl.domains)

Kernel calls are inlined (with their point variables renamed) by the checker,
so an integrand is one expression in the output's and the integral's variables.
Every node has a `width` and a `span` (the span is not part of equality).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..domains import RULES, table_enum
from ..errors import Span
from ..functions import FUNCTIONS
from .ast import DomainKind, Init, ParamKind, span_field

# Elementwise functions, one member per function of the language in `itdsl.functions`
# (Fn.EXP, Fn.ADD, ...; the value is the name); comparisons and logic give 0/1 (brackets).
Fn = Enum("Fn", [(f.fn_member, f.name) for f in FUNCTIONS.values() if f.syntax != "internal"],
          module=__name__)

CALL_FNS = {f.name: Fn(f.name) for f in FUNCTIONS.values() if f.syntax == "call"}  # exp(x)
UNARY_FNS = {name: fn for name, fn in CALL_FNS.items() if FUNCTIONS[name].arity == 1}
CMP_FNS = frozenset(Fn(f.name) for f in FUNCTIONS.values() if f.condition == "compare")
BRACKET_FNS = frozenset(Fn(f.name) for f in FUNCTIONS.values() if f.condition is not None)
INFIX = {Fn(f.name) for f in FUNCTIONS.values() if f.syntax == "infix"}


class RFn(Enum):
    DOT = "dot"
    NORM = "norm"
    SQNORM = "sqnorm"
    SUM = "sum"


# One member per quadrature rule of `itdsl.domains` (QuadRule.GAUSS, ...; the value is the
# name), `.entry` what the rule is (its arguments, kinds, nodes, weights, draws).
QuadRule = table_enum("QuadRule", RULES, __name__)


@dataclass(frozen=True, kw_only=True)
class Domain:
    name: str
    kind: DomainKind
    dim: int | None = None
    lo: float | None = None
    hi: float | None = None
    span: Span = span_field()

    @property
    def coord_width(self) -> int | None:
        """Width of a point's coordinate: D for points(D), None (a scalar) otherwise."""
        return self.dim if self.kind is DomainKind.POINTS else None


@dataclass(frozen=True, kw_only=True)
class Input:
    name: str
    domain: str
    width: int | None
    span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class Param:
    name: str
    kind: ParamKind
    width: int | None = None
    sizes: tuple[int, ...] = ()
    act: str | None = None
    init: Init | None = None
    span: Span = span_field()


# ---- expressions ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Expr:
    width: int | None
    span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class Const(Expr):
    value: float


@dataclass(frozen=True, kw_only=True)
class Coord(Expr):
    var: str
    domain: str


@dataclass(frozen=True, kw_only=True)
class FieldAt(Expr):
    field: str
    var: str


@dataclass(frozen=True, kw_only=True)
class ParamRef(Expr):
    param: str


@dataclass(frozen=True, kw_only=True)
class Op(Expr):
    fn: Fn
    args: tuple[Expr, ...]


@dataclass(frozen=True, kw_only=True)
class Reduce(Expr):
    fn: RFn
    args: tuple[Expr, ...]


@dataclass(frozen=True, kw_only=True)
class Component(Expr):
    arg: Expr
    index: int


@dataclass(frozen=True, kw_only=True)
class MlpCall(Expr):
    param: str
    args: tuple[Expr, ...]


@dataclass(frozen=True, kw_only=True)
class SplineCall(Expr):
    param: str
    args: tuple[Expr, ...]


@dataclass(frozen=True, kw_only=True)
class Quad:
    rule: QuadRule
    # the rule's arguments (`Rule.args` in itdsl.domains says which it takes)
    weights: str | None = None  # weights(w): the input field holding them
    n: int | None = None  # a rule with nodes of its own (gauss): their number
    samples: int | None = None  # montecarlo: S
    importance: Expr | None = None  # montecarlo: sampling density up to a constant
    explicit: bool = False  # written with `with` (else the domain's default)
    span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class Integral(Expr):
    var: str
    domain: str
    body: Expr
    quad: Quad


# ---- operators ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Kernel:
    """A kernel as declared (for printing and explain); uses are inlined."""

    name: str
    x: str
    x_domain: str
    y: str
    y_domain: str
    body: Expr
    span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class Output:
    name: str
    var: str
    domain: str
    body: Expr
    span: Span = span_field()

    @property
    def width(self) -> int | None:
        return self.body.width


@dataclass(frozen=True, kw_only=True)
class Operator:
    name: str
    domains: tuple[Domain, ...]
    inputs: tuple[Input, ...]
    params: tuple[Param, ...]
    kernels: tuple[Kernel, ...]
    output: Output
    span: Span = span_field()

    def domain(self, name: str) -> Domain:
        return next(d for d in self.domains if d.name == name)

    def input(self, name: str) -> Input:
        return next(i for i in self.inputs if i.name == name)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


@dataclass(frozen=True, kw_only=True)
class Program:
    operators: tuple[Operator, ...]

    def __getitem__(self, name: str) -> Operator:
        for op in self.operators:
            if op.name == name:
                return op
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(op.name for op in self.operators)


# ---- traversal ------------------------------------------------------------------------------


def children(e: Expr) -> tuple[Expr, ...]:
    """The sub-expressions of `e` (the importance expression of a montecarlo rule included)."""
    if isinstance(e, (Op, Reduce, MlpCall, SplineCall)):
        return e.args
    if isinstance(e, Component):
        return (e.arg,)
    if isinstance(e, Integral):
        imp = e.quad.importance
        return (e.body,) if imp is None else (e.body, imp)
    return ()


def walk(e: Expr):
    """Every node of `e`, parents before children (iterative: no recursion limit)."""
    stack = [e]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def free_vars(e: Expr) -> frozenset[str]:
    """The point variables `e` depends on (an integral's own variable is bound)."""
    if isinstance(e, Coord | FieldAt):
        return frozenset({e.var})
    if isinstance(e, Integral):
        inner = free_vars(e.body)
        if e.quad.importance is not None:
            inner |= free_vars(e.quad.importance)
        return inner - {e.var}
    out: frozenset[str] = frozenset()
    for c in children(e):
        out |= free_vars(c)
    return out
