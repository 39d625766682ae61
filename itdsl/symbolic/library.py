"""Forms of a Plan that a library call can compute (no torch here: the runtime runs them).

matmul: each integral of the output is `sum_j A[i, j] V[j]`, with `A[i, j]` everything
that does not read the call's inputs (the kernel, the quadrature weight: coordinates and
params only) and `V[j]` the factors that read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..frontend import ir
from . import pexpr as P
from .pexpr import Node
from .plan import Plan


@dataclass(frozen=True)
class MatmulTerm:
    step: str  # the pair-sum step it replaces
    over: str  # the side it sums over
    kernel: Node  # A[i, j]: depends on x and y, reads no field
    values: Node  # V[j]: depends on y (or nothing)


def matmul_terms(plan: Plan) -> list[MatmulTerm] | None:
    """The integrals of a matmul Plan as (A, V) pairs, or None if it is not of that form."""
    if plan.strategy != "matmul":
        return None
    terms = []
    for st in plan.forward.steps:
        if st.kind == "max":
            return None
        if st.kind != "sum":
            continue
        kernel, values = P.ONE, P.ONE
        for f in P.factors(st.expr):  # what reads the inputs is V; the rest is sampled
            if "x" in f.deps or not reads_inputs(f, plan):
                kernel = P.mul(kernel, f)
            else:
                values = P.mul(values, f)
        fields = [n for n in P.toposort([kernel]) if n.op == "field"]
        if fields or kernel.shape or plan.spaces[st.over].quad.rule is ir.QuadRule.GAUSS:
            return None
        terms.append(MatmulTerm(st.name, st.over, kernel, values))
    return terms or None


def reads_inputs(e: Node, plan: Plan) -> bool:
    """Whether `e` depends on the call's input fields (directly or through earlier steps)."""
    steps = {st.name: st for st in plan.forward.steps}
    todo, seen = [e], set()
    while todo:
        for n in P.toposort([todo.pop()]):
            if n.op in ("field", "cot"):
                return True
            if n.op == "ref" and n.attrs[0] not in seen and n.attrs[0] in steps:
                seen.add(n.attrs[0])
                todo.append(steps[n.attrs[0]].expr)
    return False


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
        if st.kind != "sum":
            continue
        outside, kernel, inside, mask = P.ONE, P.ONE, P.ONE, None
        for f in P.factors(st.expr):
            if st.over not in f.deps:
                outside = P.mul(outside, f)
            elif "x" not in f.deps:
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
    if a.op == "coord" and b.op == "coord" and a.attrs == (over,) and b.attrs == ("x",):
        return "<=" if mask.op in ("<=", ">=") else "<"
    return None


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


# ---- the forms each strategy's runtime computes -----------------------------------------------


@dataclass(frozen=True)
class LowRankSum:
    """lowrank (and causal lowrank recurrence): kernel = Σ_t a_t(x)·b_t(y), `causal` "<=" or "<"."""

    sum: PairSum
    terms: tuple[Term, ...]
    causal: str | None


@dataclass(frozen=True)
class DecaySum:
    """Exponential recurrence: kernel = Σ_k c_k · exp(E_k(x − y)) under a causal bracket; each
    E_k is affine in x − y (the recogniser proved it), so the step is exp(rate_k · Δ)."""

    sum: PairSum
    exps: tuple[tuple[Node, Node], ...]  # (c_k of params only, E_k)
    causal: str


@dataclass(frozen=True)
class ConvSum:
    """Convolution: [mask]·kernel = g(x − y; params) on one grid or index domain."""

    sum: PairSum
    half_width: float | None  # the support |x − y| <= half_width in coordinates (None: global)


@dataclass(frozen=True)
class SoftmaxForm:
    """Attention: sums of exp(s(x, y) − m(x))·inside(y) under one mask, m the masked row max
    of s; s = Σ_t a_t(x)·b_t(y) (a GEMM) + rest(x, y) (elementwise, e.g. a position bias)."""

    max_step: str
    score: Node
    terms: tuple[Term, ...]
    rest: Node | None
    mask: Node | None
    causal: str | None
    sums: tuple[PairSum, ...]

    @property
    def sdpa(self) -> bool:
        """Plain scaled dot-product attention (one dot of the two sides, no mask or the
        causal [y <= x], nothing else in the score): torch's scaled_dot_product_attention
        computes it, a library kernel that does this inner work best."""
        return (self.rest is None and self.causal in (None, "<=")
                and (self.mask is None or self.causal == "<=") and len(self.terms) == 1
                and self.terms[0].reduced and all(ps.outside == P.ONE for ps in self.sums))


def _regular(plan: Plan, over: str) -> bool:
    """x and `over` range over the same grid or index domain with its own points."""
    sx, sy = plan.spaces["x"], plan.spaces[over]
    dom = plan.op.domain(sy.domain)
    return (sx.domain == sy.domain and dom.kind.value in ("grid", "index")
            and sy.quad is not None and sy.quad.rule is not ir.QuadRule.GAUSS
            and sy.quad.rule is not ir.QuadRule.MONTECARLO)


def _of_coords(e: Node) -> bool:
    """`e` reads the two sides only through their coordinates (params and per-call steps ok)."""
    return all(n.op not in ("field", "weight", "cot") and not (n.op == "ref" and n.attrs[1])
               for n in P.toposort([e]))


def _summands(e: Node) -> list[tuple[float, Node]]:
    if e.op in ("+", "-"):
        a, b = _summands(e.args[0]), _summands(e.args[1])
        return a + ([(-s, u) for s, u in b] if e.op == "-" else b)
    if e.op == "neg":
        return [(-s, u) for s, u in _summands(e.args[0])]
    return [(1.0, e)]


def _decay(ps: PairSum) -> list[tuple[Node, Node]] | None:
    if not _of_coords(ps.kernel):
        return None
    exps = []
    for sign, term in _summands(ps.kernel):
        coef, expo = P.const(sign), None
        for f in P.factors(term):
            if "x" not in f.deps and ps.over not in f.deps:
                coef = P.mul(coef, f)
            elif f.op == "exp" and expo is None and {"x", ps.over} <= f.deps:
                expo = f.args[0]
            else:
                return None
        exps.append((coef, P.ZERO if expo is None else expo))
    return exps


def library_form(plan: Plan):
    """The form of `plan` its strategy's algorithm computes, or None (the dense kernels run)."""
    s = plan.strategy
    if s == "matmul":
        return matmul_terms(plan)
    if s not in ("lowrank", "recurrence", "convolution", "attention"):
        return None
    sums = pair_sums(plan)
    maxes = [st for st in plan.forward.steps if st.kind == "max"]
    if s == "attention":
        return _softmax(plan, maxes, sums)
    if maxes or not sums:
        return None
    out = []
    for ps in sums:
        causal = causal_mask(ps.mask, ps.over)
        if s == "convolution":
            if not (_regular(plan, ps.over) and _of_coords(ps.kernel)
                    and (ps.mask is None or _of_coords(ps.mask))):
                return None
            half = (plan.verdict.details.get("half_width") if plan.verdict else None)
            out.append(ConvSum(ps, half if isinstance(half, float) else None))
            continue
        if s == "recurrence" and not (causal and _regular(plan, ps.over)):
            return None
        if s == "lowrank" and ps.mask is not None:
            return None
        lowrank = s == "lowrank" or (plan.verdict is not None
                                      and plan.verdict.details.get("kind") == "lowrank")
        terms = separate(ps.kernel, "x", ps.over) if ps.kernel.shape == () else None
        if lowrank:
            if terms is None:
                return None
            out.append(LowRankSum(ps, tuple(terms), causal))
            continue
        exps = _decay(ps)
        if exps is None:
            return None
        out.append(DecaySum(ps, tuple(exps), causal))
    return out


def _softmax(plan: Plan, maxes, sums: list[PairSum]) -> SoftmaxForm | None:
    if len(maxes) != 1 or not sums:
        return None
    mx = maxes[0]
    m = P.ref(mx.name, "x", ())
    mask = None if mx.mask is None or mx.mask.is_const else mx.mask
    for ps in sums:
        k = ps.kernel
        if (ps.over != mx.over or ps.mask != mask or k.op != "exp" or k.args[0].op != "-"
                or k.args[0].args[1] != m or k.args[0].args[0] != mx.expr):
            return None
    terms, rest = [], None
    for sign, u in _summands(mx.expr):
        t = separate(u, "x", mx.over)
        if t is not None and all(len(q.a.shape) <= 1 for q in t):
            terms += [Term(P.mul(P.const(sign), q.a), q.b, q.reduced) for q in t]
        else:
            rest = P.mul(P.const(sign), u) if rest is None else P.add(rest, P.mul(P.const(sign), u))
    if not terms:
        return None
    causal = causal_mask(mask, mx.over) if _regular(plan, mx.over) else None  # else per tile
    if rest is not None and any(n.op == "coord" and plan.op.domain(
            plan.spaces[n.attrs[0]].domain).kind.value == "points" for n in P.toposort([rest])):
        return None  # the tiles' own backward does not differentiate coordinates
    order = [st.name for st in plan.forward.steps]
    first, last = order.index(mx.name), max(order.index(ps.step) for ps in sums)
    skipped = {mx.name} | {ps.step for ps in sums}
    for st in plan.forward.steps[first:last]:  # (all computed at the last sum)
        if st.name not in skipped and any(n.op == "ref" and n.attrs[0] in skipped
                                          for n in P.toposort([st.expr])):
            return None
    return SoftmaxForm(mx.name, mx.expr, tuple(terms), rest, mask, causal, tuple(sums))
