"""Plans: what lowering consumes.

A `Program` is a list of steps, each computing one named tensor from plan
expressions (`pexpr`), evaluated in order:

    point  side=s:  t[p]    = expr(p)                     once per point p of side s
    const:          t       = expr                         once per call (params only)
    max    side=x over y:  t[i] = max_j {expr(i,j) : mask(i,j) != 0}
    sum    side=x over y:  t[i] = sum_j expr(i,j)          a pair reduction (an integral)
           side=y over x:  t[j] = sum_i expr(i,j)          a transposed one (backward)
    total  over s:  t       = sum_p expr(p)                 (param gradients)

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
class Space:
    """The points a side ranges over: the output's (x) or an integral's (y0, y1, ...)."""

    side: str
    domain: str
    var: str
    quad: ir.Quad | None  # None for the output side
    importance: Node | None = None  # montecarlo(S, importance = ...), over this side


@dataclass(frozen=True)
class Step:
    kind: StepKind
    name: str
    side: str | None  # where the result lives (None: const/total)
    expr: Node
    over: str | None = None  # max/sum: the side summed over; total: the side summed
    mask: Node | None = None  # max: only where mask != 0

    def __post_init__(self):
        object.__setattr__(self, "kind", StepKind(self.kind))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.expr.shape


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
            roots = [st.expr] + ([st.mask] if st.mask is not None else [])
            todo.extend(n.name for n in toposort(roots) if n.op == "ref")
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
