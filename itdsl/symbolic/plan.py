"""Plans: what lowering consumes.

A `Program` is a list of steps, each computing one named tensor from plan
expressions (`pexpr`), evaluated in order:

    point  side=s:  t[p]    = expr(p)                     once per point p of side s
    const:          t       = expr                         once per call (params only)
    max    side=x over y:  t[i] = max_j {expr(i,j) : mask(i,j) != 0}
    sum    side=x over y:  t[i] = sum_j expr(i,j)          a pair reduction (an integral)
           side=y over x:  t[j] = sum_i expr(i,j)          a transposed one (backward)
    total  over s:  t       = sum_p expr(p)                 (param gradients)
    scatter target:  t[index(p)] += expr(p)                 over every point (or pair) p the
                                                            index depends on: the gradient of
                                                            a field read at computed points

Nothing is N x M: pair expressions are reduced as they are produced. A `Plan`
holds the forward program and the backward program (every gradient, as more
steps of these kinds), the spaces the sides range over, and what the analysis
found (strategy, hoisting, operation counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ..frontend import ir
from ..frontend.ast import ParamKind
from .pexpr import Node

X_SIDE = "x"  # the output's side; an integral's sides are "y0", "y1", ... (`y_side`)


def y_side(k: int) -> str:
    """The side of the k-th integral's points."""
    return f"y{k}"


class StepKind(StrEnum):
    """What a step computes (see the table above). A StrEnum: `StepKind.SUM == "sum"`."""

    CONST = "const"
    POINT = "point"
    MAX = "max"
    SUM = "sum"
    TOTAL = "total"
    SCATTER = "scatter"


class GradKind(StrEnum):
    INPUT = "input"  # an input field (or a `weights(w)` field)
    PARAM = "param"  # a param tensor, by its torch name
    COORDS = "coords"  # the coordinates of a points domain


class GradKey(str):
    """The key of one gradient the backward program computes: "input:f", "param:s.0.weight",
    "coords:X" (a str, so it prints and compares as that), with its `kind` and `name`."""

    __slots__ = ()

    def __new__(cls, kind: GradKind | str, name: str):
        return super().__new__(cls, f"{GradKind(kind).value}:{name}")

    def __getnewargs__(self):
        return (self.kind, self.name)

    @property
    def kind(self) -> GradKind:
        return GradKind(self.partition(":")[0])

    @property
    def name(self) -> str:
        return self.partition(":")[2]


@dataclass(frozen=True)
class Verdict:
    strategy: str  # a name of `symbolic.strategies.REGISTRY`
    rule: str  # the rule that fired
    form: str  # the mathematical form it matched
    reason: str  # why, with the evidence
    details: dict  # the facts the rule found (JSON-like values, shown by explain)
    rejected: tuple[tuple[str, str], ...]  # (rule, why it did not match), earlier rules


@dataclass(frozen=True)
class Factor:
    """One variable of a side: its domain and its rule (None on the output side)."""

    var: str
    domain: str
    quad: ir.Quad | None


@dataclass(frozen=True)
class Space:
    """The points a side ranges over: the output's (x) or an integral's (y0, y1, ...), the
    product of its variables' domains flattened row-major (the first variable slowest)."""

    side: str
    factors: tuple[Factor, ...]
    importance: Node | None = None  # montecarlo(S, importance = ...), over this side

    def _one(self) -> Factor:
        if len(self.factors) != 1:
            raise ValueError(f"the side {self.side} is a product of {len(self.factors)} "
                             "domains; read its factors")
        return self.factors[0]

    @property
    def domain(self) -> str:
        """The domain of a side of one variable."""
        return self._one().domain

    @property
    def var(self) -> str:
        return self._one().var

    @property
    def quad(self) -> ir.Quad | None:
        return self._one().quad

    @property
    def vars(self) -> tuple[str, ...]:
        return tuple(f.var for f in self.factors)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(f.domain for f in self.factors)

    def factor(self, var: str) -> Factor:
        return next(f for f in self.factors if f.var == var)


@dataclass(frozen=True)
class Step:
    kind: StepKind
    name: str
    side: str | None  # where the result lives (None: const/total)
    expr: Node
    over: str | None = None  # max/sum: the side summed over; total: the side summed
    mask: Node | None = None  # max: only where mask != 0
    index: tuple[Node, ...] = ()  # scatter: where each value goes (one integer per axis)
    target: str | None = None  # scatter: the GradKey whose tensor the values go into

    def __post_init__(self):
        object.__setattr__(self, "kind", StepKind(self.kind))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.expr.shape

    @property
    def roots(self) -> list[Node]:
        """The expressions the step evaluates."""
        return [self.expr, *([self.mask] if self.mask is not None else []), *self.index]


@dataclass
class Program:
    steps: list[Step] = field(default_factory=list)
    # each result (the backward: a GradKey) -> the steps to add up
    outputs: dict[str, list[str]] = field(default_factory=dict)

    def add(self, step: Step) -> Node:
        from .pexpr import ref
        self.steps.append(step)
        return ref(step.name, step.side, step.shape)

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def needed(self, keys) -> set[str]:
        """The steps that the outputs `keys` are computed from (transitively)."""
        return self.depends_on([n for k in keys for n in self.outputs.get(k, ())])

    def depends_on(self, names) -> set[str]:
        """The steps `names` and every step they are computed from (transitively)."""
        from .pexpr import toposort
        by_name = {s.name: s for s in self.steps}
        todo = list(names)
        out: set[str] = set()
        while todo:
            name = todo.pop()
            if name in out or name not in by_name:
                continue
            out.add(name)
            st = by_name[name]
            todo.extend(n.name for n in toposort(st.roots) if n.op == "ref")
        return out


@dataclass
class Hoisted:
    side: str
    name: str
    text: str
    cost: int


@dataclass
class Plan:
    op: ir.Operator
    strategy: str
    verdict: Verdict | None
    spaces: dict[str, Space]
    forward: Program
    backward: Program
    out_shape: tuple[int, ...]
    hoisted: list[Hoisted] = field(default_factory=list)
    pair_ops_before: dict[str, int] = field(default_factory=dict)  # step -> ops per pair
    pair_ops_after: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # time the analysis took
    # the strategy's typed form (symbolic/strategies/<strategy>.py), found once at analysis;
    # None for dense
    form: object = None

    @property
    def x(self) -> Space:
        return self.spaces[X_SIDE]

    def y_spaces(self) -> list[Space]:
        return [s for k, s in self.spaces.items() if k != X_SIDE]


def param_shapes(p: ir.Param) -> dict[str, tuple[int, ...]]:
    """The torch parameter names and shapes of a `.it` param (as the runtime registers them)."""
    if p.kind is ParamKind.REAL:
        return {p.name: () if p.width is None else (p.width,)}
    if p.kind is ParamKind.SPLINE:
        return {p.name: p.shape}
    out = {}
    for layer, (a, b) in enumerate(zip(p.sizes, p.sizes[1:])):
        out[f"{p.name}.{2 * layer}.weight"] = (b, a)
        out[f"{p.name}.{2 * layer}.bias"] = (b,)
    return out
