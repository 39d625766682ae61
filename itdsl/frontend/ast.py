"""The untyped syntax tree of a `.it` file.

Frozen, keyword-only dataclasses; every node carries the `span` of the text it
came from. Spans are excluded from equality and hashing, so two trees compare
equal when they mean the same program however they were spelled (this is what
the round trip `parse(print(ast)) == ast` relies on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..domains import KINDS, table_enum
from ..errors import Span

_NOSPAN = Span()


def span_field():
    """A `span` dataclass field: not part of equality, hashing or repr (ast and ir use it)."""
    return field(default=_NOSPAN, compare=False, hash=False, repr=False)


class BinOp(Enum):
    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    POW = "^"


class CmpOp(Enum):
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="


class BoolOp(Enum):
    AND = "and"
    OR = "or"


# ---- expressions --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Expr:
    span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class Number(Expr):
    value: float


@dataclass(frozen=True, kw_only=True)
class Name(Expr):
    id: str


@dataclass(frozen=True, kw_only=True)
class Call(Expr):
    func: str
    args: tuple[Expr, ...]
    func_span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class Component(Expr):
    """`base[index]`: one component of a vector (0-based)."""

    base: Expr
    index: int


@dataclass(frozen=True, kw_only=True)
class Neg(Expr):
    operand: Expr


@dataclass(frozen=True, kw_only=True)
class Binary(Expr):
    op: BinOp
    left: Expr
    right: Expr


@dataclass(frozen=True, kw_only=True)
class Compare(Expr):
    """A comparison chain `a < b <= c` (means `a < b and b <= c`)."""

    ops: tuple[CmpOp, ...]
    operands: tuple[Expr, ...]


@dataclass(frozen=True, kw_only=True)
class Logic(Expr):
    op: BoolOp
    left: Expr
    right: Expr


@dataclass(frozen=True, kw_only=True)
class Tuple(Expr):
    """`(a, b, ...)`: the interval of a tensor-product grid's axis, `grid((0, 1), (0, 2))`."""

    items: tuple[Expr, ...]


@dataclass(frozen=True, kw_only=True)
class Bracket(Expr):
    """An Iverson bracket `[cond]`: 1 where `cond` holds, else 0."""

    cond: Expr


@dataclass(frozen=True, kw_only=True)
class Binder(Expr):
    """`name: Domain` — a point variable bound to a domain."""

    name: str
    domain: str


@dataclass(frozen=True, kw_only=True)
class QuadArg(Expr):
    """One argument of a quadrature: positional (`key` None) or `key = value`."""

    key: str | None
    value: Expr


@dataclass(frozen=True, kw_only=True)
class Quadrature(Expr):
    rule: str
    args: tuple[QuadArg, ...] | None  # None: written without parentheses


@dataclass(frozen=True, kw_only=True)
class Integral(Expr):
    """`integral(v: V, t: T) body with q`: `quad` is one rule (for every variable), a
    parenthesised list of one rule per variable (a tuple), or None (each domain's default)."""

    vars: tuple[Binder, ...]
    body: Expr
    quad: Quadrature | tuple[Quadrature, ...] | None


# ---- declarations ---------------------------------------------------------------


# One member per domain kind of `itdsl.domains` (DomainKind.GRID, ...; the value is the name),
# `.entry` what the kind is (its points, spacing, measure, default rule).
DomainKind = table_enum("DomainKind", KINDS, __name__)


@dataclass(frozen=True, kw_only=True)
class Decl:
    name: str
    span: Span = span_field()
    name_span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class DomainDecl(Decl):
    kind: DomainKind
    dim: int | None = None  # points(D), index(D) for D >= 2
    lo: float | None = None  # grid(lo, hi)
    hi: float | None = None
    boxes: tuple[tuple[float, float], ...] = ()  # grid((a1, b1), (a2, b2)): one per axis
    sizes: tuple[int, ...] = ()  # stencil(k1, k2)


@dataclass(frozen=True, kw_only=True)
class InputDecl(Decl):
    domains: tuple[str, ...]  # `V * P`: a field on the product, axes in this order
    width: int | None  # None: a scalar field (R)
    domain_span: Span = span_field()


class ParamKind(Enum):
    REAL = "R"
    MLP = "mlp"
    SPLINE = "spline"


@dataclass(frozen=True, kw_only=True)
class Init:
    """The initial value of a param: `0.5`, `normal(0.02)`, `uniform(-1, 1)`."""

    kind: str  # "const" | "normal" | "uniform"
    args: tuple[float, ...]
    span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class ParamDecl(Decl):
    kind: ParamKind
    width: int | None = None  # REAL: None for R, C for R^C
    sizes: tuple[int, ...] = ()  # MLP: layer widths; SPLINE: grid of coefficients
    act: str | None = None  # MLP activation
    per: str | None = None  # SPLINE: `per = T`, one spline per point of the domain T
    init: Init | None = None
    per_span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class KernelDecl(Decl):
    params: tuple[Binder, Binder]
    body: Expr


@dataclass(frozen=True, kw_only=True)
class OutputDecl(Decl):
    vars: tuple[Binder, ...]  # `output g(u: U, p: P)`: a field on the product U * P
    body: Expr


@dataclass(frozen=True, kw_only=True)
class Operator:
    name: str
    decls: tuple[Decl, ...]
    span: Span = span_field()
    name_span: Span = span_field()


@dataclass(frozen=True, kw_only=True)
class Program:
    operators: tuple[Operator, ...]
    span: Span = span_field()
