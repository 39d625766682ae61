"""The structure every strategy's form is read from (no torch, no sympy): a Plan's forward
pair sums split into outside(x) · [mask] · kernel(x, y) · inside(y), and the structural
separation of a kernel into Σ_t a_t(x)·b_t(y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...functions import FUNCTIONS
from .. import pexpr as P
from ..pexpr import Node
from ..plan import X_SIDE, Plan, StepKind
from .entry import Miss


def reads_inputs(e: Node, plan: Plan) -> bool:
    """Whether `e` depends on the call's input fields (directly or through earlier steps)."""
    steps = {st.name: st for st in plan.forward.steps}
    todo, seen = [e], set()
    while todo:
        for n in P.toposort([todo.pop()]):
            if n.op in ("field", "cot"):
                return True
            if n.op == "ref" and n.name not in seen and n.name in steps:
                seen.add(n.name)
                todo.append(steps[n.name].expr)
    return False



def reads_coordinates(e: Node, plan: Plan) -> bool:
    """Whether `e` reads coordinates or positions, directly or through the point steps
    that hoisting made of them."""
    return any(n.op in ("coord", "pos") for n in P.toposort([inline(e, plan)]))


def inline(e: Node, plan: Plan) -> Node:
    """`e` with every ref to a forward point or per-call step replaced by its expression
    (recursively): the kernel as written, before hoisting split it into steps."""
    steps = {st.name: st for st in plan.forward.steps
             if st.kind in (StepKind.POINT, StepKind.CONST)}
    memo: dict[str, Node] = {}

    def go(n: Node) -> Node:
        mapping = {}
        for r in P.toposort([n]):
            if r.op == "ref" and r.name in steps:
                if r.name not in memo:
                    memo[r.name] = go(steps[r.name].expr)
                mapping[r] = memo[r.name]
        return P.substitute([n], mapping)[0] if mapping else n

    return go(e)



# ---- the pair sums of a Plan, split by what each factor depends on --------------------------


@dataclass(frozen=True)
class PairSum:
    """A forward sum step `I[x] = outside(x) · Σ_y [mask(x, y)] · kernel(x, y) · inside(y)`."""

    step: str
    over: str
    outside: Node  # factors of x only (or per call)
    kernel: Node  # the factors that read both x and y (brackets excluded)
    inside: Node  # factors of y only (fields, quadrature weights, per-point steps)
    mask: Node | None  # the brackets that read both x and y, multiplied


def pair_sums(plan: Plan) -> list[PairSum]:
    """The forward sum steps of `plan`, split into outside · [mask] · kernel · inside."""
    out = []
    for st in plan.forward.steps:
        if st.kind is not StepKind.SUM:
            continue
        outside, kernel, inside, mask = P.ONE, P.ONE, P.ONE, None
        for f in P.factors(st.expr):
            if st.over not in f.deps:
                outside = P.mul(outside, f)
            elif X_SIDE not in f.deps:
                inside = P.mul(inside, f)
            elif f.op in P.BRACKETS and f.shape == ():
                mask = f if mask is None else P.node("and", (mask, f))
            else:
                kernel = P.mul(kernel, f)
        out.append(PairSum(st.name, st.over, outside, kernel, inside, mask))
    return out


def causal_mask(mask: Node | None, over: str) -> str | None:
    """"<=" for `[y <= x]`, "<" for `[y < x]` (on coordinates of one domain), else None."""
    if mask is None or mask.op not in ("<=", "<", ">=", ">"):
        return None
    a, b = mask.args
    if mask.op in (">=", ">"):
        a, b = b, a
    if a.op == "coord" and b.op == "coord" and a.side == over and b.side == X_SIDE:
        return "<=" if mask.op in ("<=", ">=") else "<"
    return None


def oriented(e: Node, mask: Node | None, over: str, plan: Plan) -> Node:
    """`e` where the causal mask `[y <= x]` or `[y < x]` holds, with each abs of a
    coordinate difference whose sign the mask fixes (±c·(x − y), c a finite constant) written
    as that difference or its negative, and relu of one that is ≥ 0 as itself (the table
    entry's `signed`); `e` itself where nothing applies. Only in a linear context: under +,
    −, negation, and products or quotients by factors that read no coordinates (so the
    result stays linear in the positions: a product of two differences would become
    columns of magnitude n², whose float32 rounding grows as eps·n²), and never where the
    rewritten value would be 0 (relu(y − x)): folding it away would drop the params and any
    NaN of the rest of its product. For a summand of a score that then separates into GEMM
    columns (`attention._columns`): their values at the masked pairs are never used, and
    coordinates there are constants (no derivative at x = y changes). Anywhere else the
    rewritten form may differ at the masked pairs."""
    if causal_mask(mask, over) is None:
        return e
    a, b = mask.args if mask.op in ("<=", "<") else mask.args[::-1]  # a = y, b = x
    return oriented_by(e, a, b, plan)


def positions(e: Node, over: str) -> tuple[Node, Node] | None:
    """The scalar coordinates (y, x) that `e` reads of the two sides, where it reads one of
    each (a position term of an index or a 1-D grid)."""
    coords = [n for n in P.toposort([e]) if n.op == "coord" and not n.shape]
    ys = {n for n in coords if n.side == over}
    xs = {n for n in coords if n.side == X_SIDE}
    return (ys.pop(), xs.pop()) if len(ys) == 1 and len(xs) == 1 else None


def oriented_by(e: Node, a: Node, b: Node, plan: Plan) -> Node:
    """`oriented` where a <= b (a, b the coordinates of the two sides, in either role):
    with (y, x) below the diagonal, with (x, y) above it."""

    def sign(u: Node) -> int | None:  # +1: u >= 0 where a <= b; -1: u <= 0
        if u.op == "-" and set(u.args) == {a, b}:
            return 1 if u.args[0] is b else -1
        if u.op == "neg":
            s = sign(u.args[0])
            return None if s is None else -s
        if u.op in ("*", "/"):
            k, v = u.args if u.op == "*" and u.args[0].is_const else u.args[::-1]
            if (k.is_const and math.isfinite(k.value) and k.value != 0
                    and (u.op == "*" or k is u.args[1])):
                s = sign(v)
                return None if s is None else s if k.value > 0 else -s
        return None

    def go(u: Node) -> Node:
        f = FUNCTIONS.get(u.op)
        if f is not None and f.signed is not None and f.arity == 1:
            s = sign(u.args[0])
            v = None if s is None else f.signed(P, u.args[0], s)
            return u if v is None or P.is_zero(v) else v
        if u.op in ("+", "-", "neg"):
            args = tuple(go(x) for x in u.args)
        elif u.op in ("*", "/") and sum(reads_coordinates(x, plan) for x in u.args) == 1:
            args = tuple(go(x) if reads_coordinates(x, plan) and (u.op == "*" or i == 0) else x
                         for i, x in enumerate(u.args))
        else:
            return u
        return u if all(x is y for x, y in zip(args, u.args)) else P.rebuild(u, args)

    return go(e)


# ---- separation: K(x, y) = Σ_t a_t(x) · b_t(y) ------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One term a(x) ⊙ b(y) of a separated expression (`reduced`: summed over channels, a dot)."""

    a: Node
    b: Node
    reduced: bool = False


MAX_TERMS = 64
MAX_WIDTH = 256  # channels of one separated dot term (a product of dots multiplies them)


def _mul_terms(s: list[Term], t: list[Term]) -> list[Term] | None:
    out = []
    for u in s:
        for v in t:
            if u.reduced and v.reduced:  # dot(a, b)·dot(c, d) = dot(a ⊗ c, b ⊗ d), flattened
                wu, wv = u.a.shape[0], v.a.shape[0]
                if wu * wv > MAX_WIDTH:
                    return None
                out.append(Term(P.concat([P.mul(u.a, P.component(v.a, j)) for j in range(wv)]),
                                P.concat([P.mul(u.b, P.component(v.b, j)) for j in range(wv)]),
                                True))
                continue
            other = v if u.reduced else u if v.reduced else None
            if other is not None and (other.a.shape or other.b.shape):
                return None  # a dot (a scalar) times a vector-valued term
            out.append(Term(P.mul(u.a, v.a), P.mul(u.b, v.b), u.reduced or v.reduced))
    return out if len(out) <= MAX_TERMS else None


def _additive(e: Node, x: str, y: str) -> tuple[Node, Node] | None:
    """(p(x), q(y)) with e = p + q, or None."""
    if y not in e.deps:
        return e, P.ZERO
    if x not in e.deps:
        return P.ZERO, e
    if e.op in ("+", "-"):
        a, b = (_additive(u, x, y) for u in e.args)
        if a is None or b is None:
            return None
        f = P.add if e.op == "+" else P.sub
        return f(a[0], b[0]), f(a[1], b[1])
    if e.op == "neg":
        a = _additive(e.args[0], x, y)
        return None if a is None else (P.neg(a[0]), P.neg(a[1]))
    return None


def separate(e: Node, x: str, y: str) -> list[Term] | None:
    """Terms with Σ_t a_t(x) ⊙ b_t(y) = e (a dot term summed over its channels), or None
    when this structural expansion does not find them (the kernel then runs dense)."""
    if y not in e.deps:
        return [Term(e, P.ONE)]
    if x not in e.deps:
        return [Term(P.ONE, e)]
    op, args = e.op, e.args
    if op in ("+", "-"):
        s, t = separate(args[0], x, y), separate(args[1], x, y)
        if s is None or t is None:
            return None
        if op == "-":
            t = [Term(P.neg(u.a), u.b, u.reduced) for u in t]
        return s + t if len(s) + len(t) <= MAX_TERMS else None
    if op == "neg":
        s = separate(args[0], x, y)
        return None if s is None else [Term(P.neg(u.a), u.b, u.reduced) for u in s]
    if op == "*":
        s, t = separate(args[0], x, y), separate(args[1], x, y)
        return None if s is None or t is None else _mul_terms(s, t)
    if op == "/" and y not in args[1].deps:
        s = separate(args[0], x, y)
        return None if s is None else [Term(P.div(u.a, args[1]), u.b, u.reduced) for u in s]
    if op == "^" and args[1].is_const and args[1].value in (2.0, 3.0, 4.0):
        s = separate(args[0], x, y)
        out = s
        for _ in range(int(args[1].value) - 1):
            out = None if out is None or s is None else _mul_terms(out, s)
        return out
    if op == "dot" or op == "sum":
        if op == "sum":
            s, t = separate(args[0], x, y), [Term(P.ONE, P.ONE)]
        else:
            s, t = separate(args[0], x, y), separate(args[1], x, y)
        if s is None or t is None or any(u.reduced for u in s + t):
            return None
        prod = _mul_terms(s, t)
        if prod is None:
            return None
        out = []
        for u in prod:
            width = e.args[0].shape
            a = u.a if u.a.shape else P.node("bcast", (u.a,), shape=width)
            b = u.b if u.b.shape else P.node("bcast", (u.b,), shape=width)
            out.append(Term(a, b, True))
        return out
    if op in ("cos", "sin", "exp") and e.shape == ():
        pq = _additive(args[0], x, y)
        if pq is None:
            return None
        p, q = pq
        if op == "exp":
            return [Term(P.ew("exp", p), P.ew("exp", q))]
        cp, sp, cq, sq = (P.ew(f, u) for f, u in (("cos", p), ("sin", p), ("cos", q), ("sin", q)))
        if op == "cos":
            return [Term(cp, cq), Term(P.neg(sp), sq)]
        return [Term(sp, cq), Term(cp, sq)]
    return None


def rank(terms: list[Term]) -> int:
    return sum((t.a.shape or t.b.shape or (1,))[0] if t.reduced else 1 for t in terms)



# ---- facts about a pair sum --------------------------------------------------------------------


def regular(plan: Plan, over: str) -> bool:
    """x and `over` range over the same grid or index domain with its own points."""
    return irregular(plan, over) is None


def irregular(plan: Plan, over: str) -> str | None:
    """Why x and `over` do not range over one grid or index domain's own points (None: they
    do)."""
    sx, sy = plan.spaces[X_SIDE], plan.spaces[over]
    dom = plan.op.domain(sy.domain)
    if sx.domain != sy.domain:
        return f"the output's points ({sx.domain}) and the integral's ({sy.domain}) differ"
    if not dom.kind.entry.regular:
        return f"{dom.name} is a {dom.kind.value} domain, not a grid or an index"
    if sy.quad is None or not sy.quad.rule.entry.on_domain_points:
        return (f"the `{sy.quad.rule.value}` rule does not integrate over the points of "
                f"{dom.name} (its nodes are its own, or drawn)")
    return None


def plain_sums(plan: Plan) -> list[PairSum] | Miss:
    """The forward pair sums, or why there are none a sum-by-sum algorithm takes."""
    sums = pair_sums(plan)
    if not sums:
        return Miss("the output has no pair sum")
    if any(st.kind is StepKind.MAX for st in plan.forward.steps):
        return Miss("the Plan has a max step (a softmax shift)")
    return sums


def of_coords(e: Node) -> bool:
    """`e` reads the two sides only through their coordinates (params and per-call steps ok)."""
    return all(n.op not in ("field", "weight", "cot") and not (n.op == "ref" and n.side)
               for n in P.toposort([e]))


def summands(e: Node) -> list[tuple[float, Node]]:
    if e.op in ("+", "-"):
        a, b = summands(e.args[0]), summands(e.args[1])
        return a + ([(-s, u) for s, u in b] if e.op == "-" else b)
    if e.op == "neg":
        return [(-s, u) for s, u in summands(e.args[0])]
    return [(1.0, e)]


