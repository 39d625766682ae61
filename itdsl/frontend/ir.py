"""The checked IR: what the checker proves about a program, in one screen.

    Program   := Operator*
    Operator  := domains inputs params kernels output
    Domain    := points(D) | grid(lo, hi) | grid(boxes) | index | index(D) | stencil(sizes)
    Input     := name : Domain * ... -> R | R^C               (a field on a product)
    Output    := name (Bind, ...) = Expr                      (width: None = R, C = R^C)
    Bind      := var : Domain
    Expr      := Const | Coord(var) | FieldAt(field, Affine...) | ParamRef(param)
               | Op(fn, args)              elementwise, scalars broadcast over vectors
               | Reduce(fn, args)          dot / norm / sqnorm / sum -> scalar
               | Component(arg, index)
               | MlpCall(param, args)      args concatenated
               | SplineCall(param, args, at)   at: the point of a `per` domain
               | Integral(Bind..., body, Quad...)   one rule per variable
    Affine    := Σ c·var + d               an integer point of an index lattice (d on every axis)
    Quad      := rule [weights field] [n nodes] [samples, importance Expr]   (itdsl.domains)

A point variable of a domain of several axes (`index(2)`, `grid((a1, b1), (a2, b2))`,
`stencil(3, 3)`) is one point of the product of its axes: its coordinate is a vector.

Kernel calls are inlined (with their point variables renamed) by the checker,
so an integrand is one expression in the output's and the integral's variables.
Every node has a `width` and a `span` (the span is not part of equality).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    boxes: tuple[tuple[float, float], ...] = ()
    sizes: tuple[int, ...] = ()
    # its 1-D axes, when it has several (`axes`), made from the fields above when checked
    # (compared too: a Domain without them is not the checked one)
    parts: tuple[Domain, ...] = field(default=(), repr=False)
    span: Span = span_field()

    @property
    def coord_width(self) -> int | None:
        """Width of a point's coordinate: D for points(D), index(D) and the products of D
        axes, None (a scalar) for the domains of one axis."""
        return self.kind.entry.width(self)

    @property
    def axes(self) -> tuple[Domain, ...]:
        """The 1-D domains whose product this domain is (itself if it has one axis); its
        points are theirs flattened in row-major order (the last axis runs fastest)."""
        return self.parts or (self,)

    def with_parts(self) -> Domain:
        """This domain with its axes made (`parts`: made once, at checking, so that the
        runtime only reads them, under torch.compile too)."""
        split = self.kind.entry.split
        fields = split(self) if split is not None else None
        if fields is None:
            return self
        parts = tuple(Domain(name=f"{self.name}[{k}]", kind=self.kind, **f)
                      for k, f in enumerate(fields))
        return replace(self, parts=parts)

    @property
    def naxes(self) -> int:
        """len(self.axes), without building them."""
        return self.kind.entry.naxes(self)

    @property
    def fixed(self) -> tuple[int, ...] | None:
        """The axes' sizes when the declaration fixes them (a stencil), else None."""
        return self.kind.entry.fixed(self)

    @property
    def lattice(self) -> bool:
        """Its points are integer vectors a field can be read at with an affine point."""
        return self.kind.entry.integer


def _single(what: str, items: tuple):
    if len(items) != 1:
        raise ValueError(f"{what} has {len(items)} of them; read the tuple")
    return items[0]


@dataclass(frozen=True, kw_only=True)
class Input:
    name: str
    domains: tuple[str, ...]  # a field on their product, axes in this order
    width: int | None
    span: Span = span_field()

    @property
    def domain(self) -> str:
        """The domain of a field on one domain."""
        return _single(f"input `{self.name}` lives on a product of domains:", self.domains)


@dataclass(frozen=True, kw_only=True)
class Bind:
    """A point variable bound to a domain: `(u: U)`."""

    var: str
    domain: str


@dataclass(frozen=True, kw_only=True)
class Param:
    name: str
    kind: ParamKind
    width: int | None = None
    sizes: tuple[int, ...] = ()
    act: str | None = None
    per: str | None = None  # a spline per point of this domain (`per = T`)
    per_shape: tuple[int, ...] = ()  # ... whose axes have these (fixed) sizes
    init: Init | None = None
    span: Span = span_field()

    @property
    def shape(self) -> tuple[int, ...]:
        """A spline's coefficients: `[*per_shape, n1, n2]`."""
        return (*self.per_shape, *self.sizes)


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
class Affine:
    """An integer affine point Σ c_k·var_k + offset of an index lattice (the offset added on
    every axis); a plain read `f(x)` is the single term (1, x)."""

    terms: tuple[tuple[int, str], ...]
    offset: int = 0

    @property
    def var(self) -> str | None:
        """The variable of a bare point `x` (else None)."""
        if self.offset == 0 and len(self.terms) == 1 and self.terms[0][0] == 1:
            return self.terms[0][1]
        return None

    @property
    def vars(self) -> tuple[str, ...]:
        return tuple(v for _, v in self.terms)


@dataclass(frozen=True, kw_only=True)
class FieldAt(Expr):
    """A field read at one point of each of its domains. `plain`: every point is a variable of
    the field's own domain (no arithmetic, nothing outside it)."""

    field: str
    at: tuple[Affine, ...]
    plain: bool = True

    @property
    def var(self) -> str:
        """The point of a plain read of a field on one domain."""
        v = _single(f"the read of `{self.field}` at several points", self.at).var
        if not self.plain or v is None:
            raise ValueError(f"the read of `{self.field}` is at an affine point")
        return v

    @property
    def vars(self) -> tuple[str, ...]:
        return tuple(v for a in self.at for v in a.vars)


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
    at: str | None = None  # `per = T`: the point variable of T selecting the spline


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
    """The iterated integral over every point of the product of its variables' domains, each
    with its rule (the weight of a point is the product of the rules' weights)."""

    vars: tuple[Bind, ...]
    body: Expr
    quads: tuple[Quad, ...]  # one per variable

    @property
    def var(self) -> str:
        return _single("the integral over several variables", self.vars).var

    @property
    def domain(self) -> str:
        return _single("the integral over several variables", self.vars).domain

    @property
    def quad(self) -> Quad:
        return _single("the integral over several variables", self.quads)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.var for b in self.vars)


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
    vars: tuple[Bind, ...]  # a field on the product of their domains
    body: Expr
    span: Span = span_field()

    @property
    def var(self) -> str:
        return _single(f"the output `{self.name}` has several variables:", self.vars).var

    @property
    def domain(self) -> str:
        return _single(f"the output `{self.name}` has several variables:", self.vars).domain

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.var for b in self.vars)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(b.domain for b in self.vars)

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
        return (e.body, *(q.importance for q in e.quads if q.importance is not None))
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
    if isinstance(e, Coord):
        return frozenset({e.var})
    if isinstance(e, FieldAt):
        return frozenset(e.vars)
    if isinstance(e, Integral):
        inner = free_vars(e.body)
        for q in e.quads:
            if q.importance is not None:
                inner |= free_vars(q.importance)
        return inner - set(e.names)
    out: frozenset[str] = frozenset({e.at}) if isinstance(e, SplineCall) and e.at else \
        frozenset()
    for c in children(e):
        out |= free_vars(c)
    return out
