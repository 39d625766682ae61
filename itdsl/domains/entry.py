"""What an entry of the tables of domain kinds and quadrature rules holds (see `itdsl.domains`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class DeclarationError(ValueError):
    """A domain declaration's arguments are wrong: `message`, a `hint`, and the index of the
    argument at fault (None: the declaration as a whole)."""

    def __init__(self, message: str, hint: str | None = None, arg: int | None = None):
        super().__init__(message)
        self.message, self.hint, self.arg = message, hint, arg


def fmt(v: float) -> str:
    """A declaration's number as written: 3, not 3.0."""
    return str(int(v)) if float(v).is_integer() else repr(v)


@dataclass(frozen=True, kw_only=True)
class Kind:
    """One kind of domain (`domain X = points(2)`). `points`, `spacing` and `measure` receive
    the declared domain (its `lo` and `hi`) and a number of points n."""

    name: str  # in `.it`, and its `DomainKind` member in capitals
    usage: str  # the declaration as written, for messages: "grid(a, b)"
    arity: tuple[int, ...]  # the numbers of arguments the declaration may take
    default: str  # the name of the quadrature an integral over it takes without `with`
    given: bool  # the call passes the points' coordinates (a tensor), else their number (an int)
    min_size: int  # the fewest points a call may have
    regular: bool  # its points are evenly spaced, in order (the convolution's and scans' domains)
    points: Callable[..., np.ndarray] | None = None  # (d, n) -> [n] coordinates; None: given
    spacing: Callable[..., float] | None = None  # (d, n) -> distance between neighbours
    measure: Callable[..., float] | None = None  # (d, n) -> what one point weighs, which
    #                 `montecarlo` weights are relative to (None: montecarlo does not apply)
    # the declaration's arguments (numbers, or tuples of numbers written `(a, b)`) -> the
    # domain's fields (`dim`, `lo`, `hi`, `boxes`, `sizes`), or DeclarationError
    declare: Callable[[list], dict] = lambda vals: {}
    # a declared domain -> its 1-D axes, each as the fields of a domain of this kind with one
    # axis (the points of a product of axes are flattened in row-major order: the last axis
    # runs fastest); None: the domain is one axis
    split: Callable[..., list[dict]] | None = None
    # a declared domain -> its number of axes (what `split` would give, counted cheaply: the
    # call binding reads it on every call, under torch.compile too)
    naxes: Callable[..., int] = lambda d: 1
    # a declared domain -> the width of a point's coordinate (None: a scalar)
    width: Callable[..., int | None] = lambda d: None
    # a declared domain -> its axes' sizes when the declaration fixes them (a stencil's), else
    # None (the call gives them)
    fixed: Callable[..., tuple[int, ...] | None] = lambda d: None
    integer: bool = False  # its coordinates are integers (a lattice's point, an offset)
    text: Callable[..., str]  # (d, num) -> the declaration as the printer writes it, its
    #                 numbers by `num`
    sample: Callable[..., np.ndarray]  # (d, n, rng) -> [n, D] random points of the domain,
    #                 for the recognisers' numeric checks


@dataclass(frozen=True, kw_only=True)
class Arg:
    """One argument of a quadrature as written: `gauss(n)`, `montecarlo(S, importance = e)`."""

    field: str  # the `ir.Quad` field the checker fills with it
    kind: str  # "count": an integer in [1, limit] | "field": an input on the domain
    #            | "density": a scalar expression of the integration variable
    what: str  # what it means, for messages: "the number of nodes"
    placeholder: str  # how the usage writes it: "n"
    keyword: str | None = None  # an option written `keyword = value` (else positional, required)
    limit: int | None = None  # a count's largest value
    noun: str | None = None  # a count's name in its range error (default: `what`)


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One quadrature rule: the integral over y is Σ_j w_j · integrand(y_j). Exactly one of
    `weights` (on the domain's own points), `nodes` (points of its own), `from_input` and
    `sampled` says where the w_j come from."""

    name: str  # in `.it` (`with name`), and its `ir.QuadRule` member in capitals
    kinds: frozenset[str] | None = None  # the domain kinds it applies to (None: every kind)
    args: tuple[Arg, ...] = ()
    weights: Callable[..., np.ndarray] | None = None  # (d, m) -> [m] on the m points of d
    nodes: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None  # (d, n) -> own
    #          nodes and weights: the integrand is evaluated there, the side has n points
    #          whatever the call's size, so the integrand may read no field sampled on d
    from_input: bool = False  # the weights are the input field named by its `field` argument
    sampled: bool = False  # drawn at random per call (montecarlo)
    unit: bool = False  # every weight is 1: the summand needs no weight factor
    zeros: bool = False  # some weights may be 0: a softmax shift's max skips those points
    drops: bool = False  # a point of weight 0 is not in the sum (a point not drawn): its
    #          terms are masked as by a bracket, so a NaN or inf there reaches nothing
    empty: str | None = None  # why the rule is undefined over no points (None: 0 there)

    @property
    def own_nodes(self) -> bool:
        """The integrand is evaluated at the rule's own nodes, not at the domain's points."""
        return self.nodes is not None

    @property
    def on_domain_points(self) -> bool:
        """The side is the domain's own points, each weighted before the call is seen (no
        nodes of its own, no draws): what a convolution or a scan over positions needs."""
        return not (self.own_nodes or self.sampled)

    @property
    def positional(self) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if a.keyword is None)

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(a.keyword for a in self.args if a.keyword is not None)

    @property
    def usage(self) -> str:
        """How it is written, for hints: "`gauss(n)`", "`montecarlo(S)` or ...", "`trapezoid`"."""
        pos = [a.placeholder for a in self.positional]
        forms = [f"`{self.name}({', '.join(pos)})`" if pos else f"`{self.name}`"]
        for a in self.args:
            if a.keyword is not None:
                written = ", ".join([*pos, f"{a.keyword} = {a.placeholder}"])
                forms.append(f"`{self.name}({written})`")
        return " or ".join(forms)

    def applies_to(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def size(self, quad, m: int) -> int:
        """The number of points of the side an integral with `quad` runs over, the call
        having m points of its domain."""
        return quad.n if self.own_nodes else m
