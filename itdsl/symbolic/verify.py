"""The Plan verifier: the invariants `build.py` guarantees and the consumers rely on.

`verify_plan(plan)` raises `PlanInvariantError` (an internal error, never a user's) naming
the program, the step and the rule it breaks. The tests run it on every Plan they build
(tests/conftest.py); the runtime never does. What each rule protects:

- step kinds, sides and masks: `runtime/plan_eval.py` and `lowering/spec.py` dispatch on
  `kind` and read `side`, `over` and `mask` as `plan.py`'s table says;
- unique names, forward and backward together: both programs write one environment
  (the evaluator's `env`; the backward reads forward results by name, `module.saved`);
- refs to earlier steps, with the step's side and shape: programs run in order;
- dependencies within the step's sides: a per-point value cannot read the other side, a
  pair step reads its two sides only (it is a kernel over rows and columns);
- hoisting is complete: in a pair step, every argument of a two-sided node that depends
  on one side (or none) costs nothing (a leaf, a ref to a hoisted step);
- node shapes and dependency sets as `pexpr.py` computes them, leaves that name the
  operator's inputs, params and sides, and hash-consing (no two distinct equal nodes);
- the forward's result `out` (per x, of the output's shape) and one backward output per
  gradient key, whose steps have the shape of what they differentiate.

No torch, no TVM: this reads the Plan only.
"""

from __future__ import annotations

import math

from ..frontend.ast import DomainKind
from ..functions import FUNCTIONS
from . import pexpr as P
from .pexpr import Node
from .plan import X_SIDE, Plan, Program, Step, StepKind, param_shapes

KINDS = ("const", "point", "max", "sum", "total", "scatter")
COT = "dout"  # the one cotangent a backward program reads: the output's


class PlanInvariantError(Exception):
    """A Plan breaks an invariant of the symbolic layer: a bug in itdsl, not in the program."""


def _fail(where: str, rule: str) -> None:
    raise PlanInvariantError(f"{where}: {rule}")


def _check(cond: bool, where: str, rule: str) -> None:
    if not cond:
        _fail(where, rule)


def _shape(width: int | None) -> tuple[int, ...]:
    return () if width is None else (width,)


def verify_plan(plan: Plan) -> None:
    """Raise `PlanInvariantError` if `plan` breaks an invariant (see the module docstring)."""
    seen: dict[tuple, Node] = {}  # every node of the Plan, by structure: hash-consing
    _spaces(plan, seen)
    fwd = {st.name: st for st in plan.forward.steps}
    _program(plan, plan.forward, "forward", {}, seen)
    _check(COT not in fwd, "forward", f"no step may be named `{COT}` (the cotangent's name)")
    out = fwd.get("out")
    _check(out is not None and out.kind == "point" and out.side == X_SIDE
           and out.shape == plan.out_shape, "forward",
           f"a point step `out` per x of shape {plan.out_shape} gives the result")
    _check(not plan.forward.outputs, "forward", "the forward program's result is `out`, not "
           "a list of outputs")
    _program(plan, plan.backward, "backward", fwd, seen)
    _gradients(plan)
    pair = {st.name for prog in (plan.forward, plan.backward) for st in prog.steps
            if st.kind in (StepKind.SUM, StepKind.MAX)}
    _check(set(plan.pair_ops_after) == pair, "plan",
           "operations per pair are counted for exactly the pair steps")
    names = {st.name: st.side for prog in (plan.forward, plan.backward) for st in prog.steps}
    for h in plan.hoisted:
        _check(h.name in names and (names[h.name] or "const") == h.side, f"hoisted {h.name}",
               "names a step of that side")


def _spaces(plan: Plan, seen: dict[tuple, Node]) -> None:
    _check(X_SIDE in plan.spaces and all(f.quad is None for f in plan.spaces[X_SIDE].factors),
           "spaces",
           "x is the output's side, without a quadrature")
    op = plan.op
    for key, sp in plan.spaces.items():
        where = f"space {key}"
        _check(sp.side == key, where, "is filed under its own side")
        _check(bool(sp.factors) and all(any(d.name == f.domain for d in op.domains)
                                        for f in sp.factors), where, "ranges over domains")
        if key == X_SIDE:
            _check(tuple((f.domain, f.var) for f in sp.factors)
                   == tuple((b.domain, b.var) for b in op.output.vars), where,
                   "is the output's domains and variables")
            continue
        _check(key[0] == "y" and key[1:].isdigit()
               and all(f.quad is not None for f in sp.factors), where,
               "an integral's side is y<k> with a quadrature per variable")
        if sp.importance is not None:
            _nodes(plan, [sp.importance], where + " importance", {key}, {}, set(), seen)


def _program(plan: Plan, prog: Program, phase: str, visible: dict[str, Step],
             seen: dict[tuple, Node]) -> None:
    """The steps of one program, in order; `visible`: the forward's steps (for the backward)."""
    defined: dict[str, Step] = {}
    for st in prog.steps:
        where = f"{phase} step {st.name}"
        _check(st.name not in defined and st.name not in visible, where,
               "step names are unique (forward and backward share one environment)")
        _step(plan, st, phase, where)
        roots = st.roots
        allowed = {st.side, st.over} - {None}
        if st.kind is StepKind.SCATTER:  # over every point (pair) its index depends on
            allowed = set(frozenset().union(*(i.deps for i in st.index)))
        _nodes(plan, roots, where, allowed, {**visible, **defined},
               {COT} if visible else set(), seen)
        defined[st.name] = st
    for key, names in prog.outputs.items():
        _check(bool(names) and len(set(names)) == len(names)
               and all(n in defined for n in names), f"{phase} output {key}",
               "names distinct existing steps")


def _step(plan: Plan, st: Step, phase: str, where: str) -> None:
    sides = plan.spaces
    _check(st.kind in KINDS, where, f"kind `{st.kind}` is one of {', '.join(KINDS)}")
    _check((st.mask is not None) == (st.kind is StepKind.MAX), where,
           "a max step, and only a max step, has a mask")
    if st.kind is StepKind.POINT:
        _check(st.side in sides and st.over is None, where, "a point step lives on a side")
    elif st.kind is StepKind.CONST:
        _check(st.side is None and st.over is None, where, "a const step has no side")
    elif st.kind is StepKind.TOTAL:
        _check(st.side is None and st.over in sides, where,
               "a total has no side and sums over one")
    elif st.kind is StepKind.SCATTER:
        _check(st.side is None and st.over is None and phase == "backward"
               and bool(st.index) and all(i.shape == () for i in st.index)
               and st.target is not None, where,
               "a scatter (backward) has no side, a scalar index per axis and a target")
        return
    else:
        _check(st.side in sides and st.over in sides and st.side != st.over
               and X_SIDE in (st.side, st.over), where,
               f"a {st.kind} step is per point of one side, over another, one of them x")
    if st.kind is StepKind.MAX:
        _check(phase == "forward" and st.side == X_SIDE, where,
               "a max step (a softmax shift) is per x in the forward")
        _check(st.expr.shape == () and st.mask.shape == (), where,
               "a max step's value and mask are scalars")
    if st.kind in (StepKind.SUM, StepKind.MAX):
        for n in (n for n in P.toposort(st.roots) if len(n.deps) == 2):
            for a in n.args:
                _check(len(a.deps) == 2 or P.cost([a]) == 0, where,
                       f"hoisting left {a!r}, of one side (or none), in the pair loop")


def _nodes(plan: Plan, roots: list[Node], where: str, allowed: set[str],
           steps: dict[str, Step], cots: set[str], seen: dict[tuple, Node]) -> None:
    """Every node under `roots`: its dependencies within `allowed`, its leaves real, its
    shape and dependencies as `pexpr` builds them, no two distinct nodes equal (`seen`: the
    Plan's nodes so far, by op, attrs, shape and the identity of their arguments)."""
    for n in P.toposort(roots):
        key = (n.op, n.attrs, n.shape, tuple(id(a) for a in n.args))
        _check(seen.setdefault(key, n) is n, where,
               f"hash-consing: two distinct equal nodes {n!r}")
        _check(n.deps <= allowed, where,
               f"{n!r} depends on {sorted(n.deps)}, outside the step's sides {sorted(allowed)}")
        if n.op in P.LEAVES:
            _leaf(plan, n, where, steps, cots)
        else:
            _check(n.deps == frozenset().union(*(a.deps for a in n.args)), where,
                   f"{n!r}: its dependencies are its arguments'")
            _check(_shape_ok(n), where, f"{n!r}: shape inconsistent with its arguments")


def _leaf(plan: Plan, n: Node, where: str, steps: dict[str, Step], cots: set[str]) -> None:
    op, spaces = plan.op, plan.spaces
    _check(not n.args, where, f"{n!r}: a leaf has no arguments")
    if n.op == "const":
        _check(n.shape == () and not n.deps, where, f"{n!r}: a constant is a scalar")
    elif n.op == "param":
        shapes = {k: v for p in op.params for k, v in param_shapes(p).items()}
        _check(n.name in shapes and math.prod(shapes[n.name]) == math.prod(n.shape)
               and not n.deps, where, f"{n!r}: a param of the operator, with its size")
    elif n.op == "ref":
        name, side = n.name, n.side
        st = steps.get(name)
        _check(st is not None, where, f"ref `{name}` names an earlier step")
        _check((st.side, st.shape) == (side, n.shape), where,
               f"ref `{name}` has its step's side and shape")
        _check(n.deps == (frozenset() if side is None else {side}), where,
               f"ref `{name}` depends on its side")
    elif n.op == "cot":
        _check(n.name in cots and n.side == X_SIDE and n.shape == plan.out_shape
               and n.deps == {"x"}, where,
               f"{n!r}: only the backward reads a cotangent: `{COT}`, per x, the output's shape")
    else:  # coord, pos, field, weight: a value at a side's point
        side = n.side
        _check(side in spaces and n.deps == {side}, where, f"{n!r}: at a point of a side")
        sp = spaces[side]
        if n.op == "field":
            inputs = {i.name: i for i in op.inputs}
            i = inputs.get(n.name)
            _check(i is not None and i.domains == sp.domains and n.shape == _shape(i.width),
                   where, f"{n!r}: an input on its side's domains, with its width")
            return
        _check(n.var in sp.vars, where, f"{n!r}: a variable of its side")
        f = sp.factor(n.var)
        domain = op.domain(f.domain)
        if n.op == "coord":
            _check(n.shape == _shape(domain.coord_width), where,
                   f"{n!r}: a coordinate of its variable's domain")
        elif n.op == "pos":
            k = len(domain.axes)
            _check(n.shape == (() if k == 1 else (k,)), where,
                   f"{n!r}: a position per axis of its variable's domain")
        else:
            _check(f.quad is not None and n.shape == (), where,
                   f"{n!r}: a quadrature weight of an integral's variable")


def _width(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def _shape_ok(n: Node) -> bool:
    """`n.shape` as `pexpr`'s constructors compute it from the arguments."""
    a, s = n.args, n.shape
    if n.op in FUNCTIONS:
        return len(a) == FUNCTIONS[n.op].arity and {x.shape for x in a} - {()} <= {s}
    if n.op == "where":
        return len(a) == 3 and {x.shape for x in a} - {()} <= {s}
    if n.op == "zeros":
        return not a and s != ()
    if n.op == "dot":
        return len(a) == 2 and a[0].shape == a[1].shape and s == ()
    if n.op == "sum":
        return len(a) == 1 and s == ()
    if n.op == "component":
        return len(a) == 1 and len(a[0].shape) == 1 and 0 <= n.attr("index") < a[0].shape[0] \
            and s == ()
    if n.op == "onehot":
        i, w = n.attrs
        return len(a) == 1 and a[0].shape == () and 0 <= i < w and s == (w,)
    if n.op == "concat":
        return bool(a) and all(len(x.shape) <= 1 for x in a) \
            and s == (sum(_width(x.shape) for x in a),)
    if n.op == "slice":
        lo, hi = n.attrs
        return len(a) == 1 and len(a[0].shape) == 1 and 0 <= lo < hi <= a[0].shape[0] \
            and s == (hi - lo,)
    if n.op == "linear":
        col, k, transpose = n.attrs
        if len(a) != 2 or len(a[0].shape) != 2 or len(a[1].shape) > 1:
            return False
        rows, cols = a[0].shape
        if transpose:
            return a[1].shape == (rows,) and col + k <= cols and s == (k,)
        return _width(a[1].shape) == k and col + k <= cols and s == (rows,)
    if n.op == "outer":
        col, cols = n.attrs
        return len(a) == 2 and all(len(x.shape) <= 1 for x in a) \
            and col + _width(a[1].shape) <= cols and s == (_width(a[0].shape), cols)
    if n.op == "basis":
        return len(a) == 1 and a[0].shape == () and s == (n.attr("nodes"),)
    if n.op == "bcast":
        return len(a) == 1 and a[0].shape == () and len(s) == 1
    if n.op == "read":
        return bool(a) and all(x.shape == () for x in a) and len(s) <= 1
    return False  # an op pexpr does not build


def _gradients(plan: Plan) -> None:
    """One backward output per gradient key, each step shaped like what it differentiates:
    a param's gradient per call, an input's (or coordinates') per point of its domain."""
    op, bwd = plan.op, plan.backward
    steps = {st.name: st for st in bwd.steps}
    params = {k: v for p in op.params for k, v in param_shapes(p).items()}
    for key, names in bwd.outputs.items():
        where = f"backward output {key}"
        kind, _, name = key.partition(":")
        for st in (steps[n] for n in names):
            if kind == "param":
                _check(name in params and st.kind is StepKind.CONST
                       and math.prod(st.shape) == math.prod(params[name]),
                       where, f"step {st.name} is per call, of the param's size "
                       f"{params.get(name)}")
                continue
            if kind == "input":
                i = next((i for i in op.inputs if i.name == name), None)
                _check(i is not None, where, "names an input of the operator")
                domains, shape = i.domains, _shape(i.width)
            else:
                _check(kind == "coords", where, "is input:, param: or coords:")
                d = next((d for d in op.domains if d.name == name), None)
                _check(d is not None and d.kind is DomainKind.POINTS, where,
                       "names a points domain")
                domains, shape = (d.name,), _shape(d.coord_width)
            if st.kind is StepKind.SCATTER:
                _check(st.target == key and st.shape == shape, where,
                       f"scatter {st.name} fills {key}, of shape {shape}")
                continue
            _check(st.kind is StepKind.POINT and plan.spaces[st.side].domains == domains
                   and st.shape == shape, where,
                   f"step {st.name} is per point of `{' * '.join(domains)}`, of shape {shape}")
