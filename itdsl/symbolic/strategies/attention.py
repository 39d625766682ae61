"""Attention: out(x) = ∫ exp(s(x,y))·[mask]·v(y) / ∫ exp(s(x,y))·[mask], a softmax.

Recognised on the IR (every integral a normalised ratio whose kernel is exponentials under
brackets); on the Plan, the one max step (the shift m) and the sums of exp(s − m)·inside(y)
under one mask, with s split into a GEMM part Σ_t a_t(x)·b_t(y) and an elementwise rest (a
position term). The runtime (`itdsl/runtime/strategies/attention.py`) runs a score that is
all GEMM (no rest) by torch's SDPA and anything else by its own tiled online softmax."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...frontend import ir
from ...frontend.printer import format_ir_expr
from .. import pexpr as P
from ..pexpr import Node
from ..plan import X_SIDE, Plan, StepKind
from ..show import show
from .entry import Match, Miss, Rule, Strategy
from .forms import (
    PairSum,
    Term,
    causal_mask,
    inline,
    oriented,
    oriented_by,
    pair_sums,
    positions,
    rank,
    reads_coordinates,
    regular,
    separate,
    summands,
)

if TYPE_CHECKING:
    from ..recognize import Analysis, Item


# ---- recognition (on the IR) -----------------------------------------------------------------


def _attention_item(A: Analysis, item: Item) -> Match | Miss:
    if not item.unit.normalised:
        return Miss("a plain integral, not a normalised ratio ∫K·v / ∫K")
    smooth = item.smooth
    if not smooth:
        return Miss("K has no exponential factor")
    for f in smooth:
        if not (isinstance(f, ir.Op) and f.fn is ir.Fn.EXP):
            return Miss(f"the kernel factor `{format_ir_expr(f)}` is not an exponential")
    score = " + ".join(format_ir_expr(f.args[0]) for f in smooth)
    masks = item.brackets
    causal = False
    if masks and item.scalar_coords:
        iv = A.support(item, masks)
        causal = iv is not None and iv.lo >= 0
    mask = " * ".join(format_ir_expr(b) for b in masks) or None
    why = f"K = exp({score})" + (f" masked by {mask}" if mask else "")
    if causal:
        why += f" (causal: the mask keeps {item.y} <= {item.x})"
    return Match(why + "; the ratio is a softmax", {"causal": causal, "score": score,
                                                     "mask": mask})


def match_attention(A: Analysis) -> Match | Miss:
    """out(x) = ∫ exp(s(x,y))·[mask]·v(y) / ∫ exp(s(x,y))·[mask]  ->  attention"""
    ms, miss = A.per_item(_attention_item)
    if miss is not None:
        return miss
    masks = [m.details["mask"] for m in ms if m.details["mask"]]
    return Match(A.joined(ms), {"causal": all(m.details["causal"] for m in ms),
                               "score": " ; ".join(m.details["score"] for m in ms),
                               "mask": " ; ".join(masks) if masks else None})


RULES = (Rule("softmax-attention", "attention",
              "out(x) = ∫ exp(s(x,y))·[mask]·v(y) / ∫ exp(s(x,y))·[mask]", match_attention),)


# ---- the form (on the Plan) ------------------------------------------------------------------


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
    live: Node | None = None  # of y only: 0 at the points out of the max (weight 0)
    # summands of s that separate only as the causal mask orients them (|x − y| = x − y)
    linearised: tuple[Node, ...] = ()
    # no mask, a rest that separates on each side of the diagonal (|x − y| = x − y for y <= x,
    # y − x above): the GEMM terms of s for y <= x and for y > x (`split_sdpa`)
    split: tuple[tuple[Term, ...], tuple[Term, ...]] | None = None

    @property
    def sdpa(self) -> bool:
        """Scaled dot-product attention: a score that is all GEMM, Σ_t a_t(x)·b_t(y) (q·k,
        and any position term that separates, such as ALiBi's slope·(y − x), as extra
        columns of the two factors), no mask or the causal [y <= x]: torch's
        scaled_dot_product_attention computes it on the factors side by side, a library
        kernel that does this inner work best."""
        return (self.rest is None and self.live is None and self.causal in (None, "<=")
                and (self.mask is None or self.causal == "<=")
                and all(ps.outside == P.ONE for ps in self.sums))

    @property
    def split_sdpa(self) -> bool:
        """No mask and a position term whose sign each side of the diagonal fixes (ALiBi's
        slope·|x − y|): SDPA twice, causally on y <= x and on the reversed points for y > x,
        each an all-GEMM score, merged by their log-sum-exps."""
        return (self.split is not None and self.mask is None and self.live is None
                and all(ps.outside == P.ONE for ps in self.sums))



def find(plan: Plan) -> SoftmaxForm | Miss:
    maxes = [st for st in plan.forward.steps if st.kind is StepKind.MAX]
    return _softmax(plan, maxes, pair_sums(plan))


def _softmax(plan: Plan, maxes, sums: list[PairSum]) -> SoftmaxForm | Miss:
    if len(maxes) != 1 or not sums:
        return Miss(f"the Plan has {len(maxes)} max steps; one softmax has one")
    mx = maxes[0]
    m = P.ref(mx.name, X_SIDE, ())
    # the max's mask: brackets of x and y (the sums' mask), and of y only (the live points:
    # a weight that may be 0), which the sums carry among their factors of y
    mask = live = None
    if mx.mask is not None and not mx.mask.is_const:
        for g in P.factors(mx.mask):
            if X_SIDE in g.deps:
                mask = g if mask is None else P.node("and", (mask, g))
            else:
                live = g if live is None else P.mul(live, g)
    for ps in sums:
        k = ps.kernel
        if (ps.over != mx.over or ps.mask != mask or k.op != "exp" or k.args[0].op != "-"
                or k.args[0].args[1] != m or k.args[0].args[0] != mx.expr
                or (live is not None and not set(P.factors(inline(live, plan)))
                    <= set(P.factors(inline(ps.inside, plan))))):
            return Miss(f"the sum {ps.step} is not exp(s − max) under the max step's mask")
    terms, rest, linearised = [], None, []
    for sign, u in summands(mx.expr):
        t = _columns(u, mx.over, plan)
        if t is None and regular(plan, mx.over):
            # under a causal mask a position term such as slope·|x − y| is linear: taken so
            # where it then separates (else the term stays as written, per tile)
            v = oriented(u, mask, mx.over, plan)
            t = None if v is u else _columns(v, mx.over, plan)
            if t is not None:
                linearised.append(u)
        if t is not None:
            terms += [Term(P.mul(P.const(sign), q.a), q.b, q.reduced) for q in t]
        else:
            rest = P.mul(P.const(sign), u) if rest is None else P.add(rest, P.mul(P.const(sign), u))
    if not terms:
        return Miss("no part of the score separates into a(x)·b(y) (a GEMM)")
    causal = causal_mask(mask, mx.over) if regular(plan, mx.over) else None  # else per tile
    split = None
    if rest is not None and mask is None and regular(plan, mx.over):
        split = _split(rest, terms, mx.over, plan)
    if rest is not None and any(n.op == "coord" and plan.op.domain(
            plan.spaces[n.side].domain).kind.entry.given for n in P.toposort([rest])):
        return Miss("the position term reads coordinates of a points domain, which the tiles' "
                    "own backward does not differentiate")
    order = [st.name for st in plan.forward.steps]
    first, last = order.index(mx.name), max(order.index(ps.step) for ps in sums)
    skipped = {mx.name} | {ps.step for ps in sums}
    for st in plan.forward.steps[first:last]:  # (all computed at the last sum)
        if st.name not in skipped and any(n.op == "ref" and n.name in skipped
                                          for n in P.toposort([st.expr])):
            return Miss(f"the step {st.name} between the max and the last sum reads them")
    return SoftmaxForm(mx.name, mx.expr, tuple(terms), rest, mask, causal, tuple(sums), live,
                       tuple(linearised), split)


def _split(rest: Node, terms: list[Term], over: str, plan: Plan):
    """The GEMM terms of the score below and on the diagonal (y <= x) and above it (y > x),
    where the rest separates on each side once the side fixes the sign of its position
    terms (`oriented_by`), else None."""
    pos = positions(rest, over)
    if pos is None:
        return None
    y, x = pos
    sides = []
    for a, b in ((y, x), (x, y)):  # (y <= x; x <= y, of which y > x is used)
        v = oriented_by(rest, a, b, plan)
        t = None if v is rest else _columns(v, over, plan)
        if not t:  # (None, or no column: a rest that cancels, left to the tiles)
            return None
        sides.append(tuple(terms) + tuple(t))
    return sides[0], sides[1]


def _columns(u: Node, over: str, plan: Plan) -> list[Term] | None:
    """The GEMM columns of one summand of a score, or None: where it does not separate, or
    where a column would be an exponential of coordinates, directly or through the point
    steps hoisting made of them (exp(y − x) as exp(−x)·exp(y): each factor overflows past
    a coordinate of ~88 in float32 where the product does not)."""
    t = separate(u, X_SIDE, over)
    if t is None or any(len(q.a.shape) > 1 for q in t):
        return None
    for n in P.toposort([inline(f, plan) for q in t for f in (q.a, q.b)]):
        if n.op == "exp" and reads_coordinates(n.args[0], plan):
            return None
    return t


def runs_as(plan: Plan, form: SoftmaxForm) -> list[str]:
    taken = [f"      under the causal mask, {show(u)} taken as linear in the positions "
             f"(its sign fixed by the mask): it separates" for u in form.linearised]
    if form.sdpa:
        return ["    runs as (torch, no generated kernel):", *taken,
                f"      torch's scaled_dot_product_attention (a library flash kernel, forward "
                f"and backward) on the score's factors a(x), b(y) (rank "
                f"{rank(list(form.terms))}) and v(y), the narrower side padded with zero "
                "columns to one width; the sums are taken relative to the row's log-sum-exp",
                "      factors with an inf or NaN (checked per call, not under torch.compile) "
                "go to the tiled online softmax, which gives torch's softmax values"]
    if form.split_sdpa:
        lo, hi = (rank(list(t)) for t in form.split)
        return ["    runs as (torch, no generated kernel):",
                f"      {show(form.rest)} taken as linear on each side of the diagonal (its "
                "sign fixed there): it separates",
                f"      torch's flash attention twice (forward and backward): causally for "
                f"y <= x (rank {lo}) and on the reversed points for y > x (rank {hi}), merged "
                "by the two log-sum-exps; on the CPU, factors finite and in range (checked per "
                "call, not under torch.compile)",
                "      else the tiled online softmax below, with the term per tile",
                *_tiles(form)]
    return ["    runs as (torch, no generated kernel):", *taken, *_tiles(form)]


def _tiles(form: SoftmaxForm) -> list[str]:
    """How the tiled online softmax runs a form."""
    extra = f" + ({show(form.rest)}) per tile" if form.rest is not None else ""
    mask = {"<=": "causal [y <= x]: tiles above the diagonal skipped",
            "<": "causal [y < x]: tiles above the diagonal skipped"}.get(
                form.causal, "mask evaluated per tile" if form.mask is not None else "no mask")
    if form.live is not None:
        mask += "; the points of weight 0 masked"

    return [f"      scores = a(x)·b(y) by torch GEMM per tile (rank {rank(list(form.terms))})"
            f"{extra}; {mask}",
            "      online softmax over column tiles (running max and sum), Σ exp(s − max)·v "
            "by GEMM; O(n·C) memory",
            "      backward: its own flash backward (scores recomputed per tile, 5 GEMMs)"]


STRATEGY = Strategy(
    name="attention", rules=RULES,
    algorithm="tiled online softmax: a running max and sum per x, causal tiles skipped; the "
              "backward recomputes the scores (flash attention)",
    complexity="O(n·m·d) time, O(n·d) extra memory",
    find=find, runs_as=runs_as)
