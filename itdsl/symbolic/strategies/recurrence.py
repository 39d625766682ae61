"""Recurrence: a causal kernel K(t, s)·[s <= t] on one grid or index domain, run as a scan.

Two rules: decaying exponentials, g(t − s) = Σ_k c_k·exp(−a_k·(t − s)) (a scan built from
exp(rate·Δ), Δ >= 0), and a finite-rank kernel under the bracket (causal linear attention: a
chunked scan of the running state Σ ψ(s)·f(s)ᵀ). Which one fired is the verdict's rule; the
form is one `DecaySum` or one `LowRankSum` per pair sum.

Decisions: an exponential whose rate is provably negative is not a recurrence (its state
grows; the chunked scan would overflow): it stays a causal convolution. A rate of unknown sign
(a plain param) is assumed to be a decay and reported (`decay: "assumed"`). `[s <= t]` alone
is a running sum (one state of rate 0). A strict `[s < t]` is not the recurrence form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...frontend.ast import DomainKind
from .. import pexpr as P
from ..pexpr import Node
from ..plan import X_SIDE, Plan
from .entry import LIBRARY, Match, Miss, Rule, Strategy, short
from .forms import (
    PairSum,
    causal_mask,
    irregular,
    of_coords,
    plain_sums,
    summands,
)

if TYPE_CHECKING:
    from ..recognize import Analysis, Item
from .lowrank import LowRankSum, lowrank_sum

# ---- recognition (on the IR) -----------------------------------------------------------------


def _exponential_item(A: Analysis, item: Item) -> Match | Miss:
    import sympy as sp

    from ..tosympy import expand
    miss = A.one_grid(item, "a recurrence") or A.no_fields(item) or A.causal_bracket(item)
    if miss is not None:
        return miss
    shifted = A.shift(item, A.product(item.smooth))
    if shifted is None:
        return Miss("K without its bracket is not a function of t − s")
    g, how = shifted
    d = A.d
    rates: dict[sp.Expr, sp.Expr] = {}
    for term in sp.Add.make_args(expand(g)):
        coef, dep = term.as_independent(d, as_Add=False)
        exponent = sp.S.Zero
        for f in sp.Mul.make_args(dep):
            if isinstance(f, sp.exp):
                exponent += f.args[0]
            elif f != 1:
                return Miss(f"g(d) = {short(g)}: the factor `{short(f, 60)}` is not an "
                            "exponential of d")
        c0, lin = sp.expand(exponent).as_independent(d, as_Add=True)
        rate = sp.expand(-lin / d)
        if d in rate.free_symbols:
            return Miss(f"g(d) = {short(g)}: the exponent `{short(exponent, 60)}` is not "
                        "linear in d")
        rates[rate] = rates.get(rate, sp.S.Zero) + coef * sp.exp(c0)
    rates = {r: c for r, c in rates.items() if sp.expand(c) != 0}
    if not rates:
        return Miss(f"g(d) = {short(g)} vanishes")
    decay = "proven"
    for r in rates:
        if r.is_nonnegative:
            continue
        if r.is_negative or r.could_extract_minus_sign():
            return Miss(f"g(d) = {short(g)} grows: the rate {r} is negative, and a scan of a "
                        "growing exponential overflows; it stays a causal convolution")
        decay = "assumed"
    n = len(rates)
    hankel = _hankel_rank(A, item, n)
    if hankel is not None and hankel > n:
        return Miss(f"g(d) = {short(g)} looked like {n} exponentials, but a Hankel matrix of "
                    f"samples has rank {hankel}")
    shown = ", ".join(str(r) for r in rates)
    why = (f"{how}; g(d) = {short(g)}: {n} exponential state{'s' if n > 1 else ''} with rate"
           f"{'s' if n > 1 else ''} {shown} (decay {decay})")
    if hankel is not None:
        why += f"; Hankel rank of samples {hankel}"
    return Match(why, {"kind": "exponential", "states": n,
                       "rates": tuple(str(r) for r in rates), "decay": decay})


def _hankel_rank(A: Analysis, item: Item, states: int) -> int | None:
    """The numeric rank of the Hankel matrix [g((i + j)·h)] of samples of K(t0 + d, t0)."""
    n = states + 2
    k = np.arange(2 * n - 1, dtype=float)[:, None]
    if item.xdom.kind is DomainKind.INDEX:
        t0, h = 2.0, 1.0
    else:
        t0, h = item.xdom.lo, (item.xdom.hi - item.xdom.lo) / (4 * n)
    rng = np.random.default_rng(A.rng_seed)
    env = A.env(item, t0 + k * h, np.full_like(k, t0), rng)
    vals = A.kernel_values(item, env, len(k))
    if not np.all(np.isfinite(vals)):
        return None
    idx = np.arange(n)[:, None] + np.arange(n)[None, :]
    return max(A.numeric_rank(vals[idx, w]) for w in range(vals.shape[1]))


def match_exponential_recurrence(A: Analysis) -> Match | Miss:
    """K(t,s) = g(t−s)·[s<=t],  g(d) = Σ_k c_k·exp(−a_k·d), a_k >= 0  ->  recurrence"""
    ms, miss = A.per_item(_exponential_item)
    if miss is not None:
        return miss
    return Match(A.joined(ms), {"kind": "exponential",
                               "states": sum(m.details["states"] for m in ms),
                               "rates": tuple(r for m in ms for r in m.details["rates"]),
                               "decay": "assumed" if any(m.details["decay"] == "assumed"
                                                         for m in ms) else "proven"})


def _causal_lowrank_item(A: Analysis, item: Item) -> Match | Miss:
    miss = A.one_grid(item, "a recurrence") or A.causal_bracket(item)
    if miss is not None:
        return miss
    sep = A.separation(item, item.smooth)
    if isinstance(sep, Miss):
        return sep
    return Match(f"K = (finite-rank kernel)·[{item.y} <= {item.x}]: {sep.reason}",
                 {"kind": "lowrank", "states": sep.details["rank"], "rates": ()})


def match_causal_lowrank(A: Analysis) -> Match | Miss:
    """K(t,s) = Σ_{r<R} φ_r(t)·ψ_r(s)·[s<=t]  ->  recurrence with R states (causal linear
    attention)"""
    ms, miss = A.per_item(_causal_lowrank_item)
    if miss is not None:
        return miss
    return Match(A.joined(ms), {"kind": "lowrank",
                               "states": sum(m.details["states"] for m in ms), "rates": ()})


EXPONENTIAL, CAUSAL_LOWRANK = "causal-exponential-decay", "causal-lowrank"
RULES = (
    Rule(EXPONENTIAL, "recurrence",
         "K(t,s) = g(t−s)·[s<=t], g = Σ_k c_k·exp(−a_k·(t−s)), a_k >= 0",
         match_exponential_recurrence),
    Rule(CAUSAL_LOWRANK, "recurrence", "K(t,s) = Σ_{r<R} φ_r(t)·ψ_r(s)·[s<=t]",
         match_causal_lowrank),
)


# ---- the form (on the Plan) ------------------------------------------------------------------


@dataclass(frozen=True)
class DecaySum:
    """Exponential recurrence: kernel = Σ_k c_k · exp(E_k(x − y)) under a causal bracket; each
    E_k is affine in x − y (the recogniser proved it), so the step is exp(rate_k · Δ)."""

    sum: PairSum
    exps: tuple[tuple[Node, Node], ...]  # (c_k of params only, E_k)
    causal: str



def decay_terms(ps: PairSum) -> list[tuple[Node, Node]] | None:
    if not of_coords(ps.kernel):
        return None
    exps = []
    for sign, term in summands(ps.kernel):
        coef, expo = P.const(sign), None
        for f in P.factors(term):
            if X_SIDE not in f.deps and ps.over not in f.deps:
                coef = P.mul(coef, f)
            elif f.op == "exp" and expo is None and {"x", ps.over} <= f.deps:
                expo = f.args[0]
            else:
                return None
        exps.append((coef, P.ZERO if expo is None else expo))
    return exps



def find(plan: Plan) -> tuple[LowRankSum | DecaySum, ...] | Miss:
    sums = plain_sums(plan)
    if isinstance(sums, Miss):
        return sums
    lowrank = plan.verdict is not None and plan.verdict.rule == CAUSAL_LOWRANK
    out = []
    for ps in sums:
        causal = causal_mask(ps.mask, ps.over)
        if not causal:
            return Miss(f"the sum {ps.step} is not under a causal bracket [y <= x]")
        why = irregular(plan, ps.over)
        if why is not None:
            return Miss(why)
        if lowrank:
            f = lowrank_sum(ps, causal)
        else:
            exps = decay_terms(ps)
            f = None if exps is None else DecaySum(ps, tuple(exps), causal)
        if f is None:
            return Miss(f"the kernel of {ps.step} is not " + (
                "separated structurally" if lowrank else "a sum of exponentials of x − y"))
        out.append(f)
    return tuple(out)


def runs_as(plan: Plan, form) -> list[str]:
    from .lowrank import describe
    out = [LIBRARY]
    for f in form:
        if isinstance(f, DecaySum):
            out.append(f"      {f.sum.step}: {len(f.exps)} decaying exponential(s): chunked "
                       "scan built from exp(rate·Δ), Δ >= 0 (recursive over chunks)")
        else:
            out.append(describe(f))
    return out


STRATEGY = Strategy(
    name="recurrence", rules=RULES,
    algorithm="chunked linear scan: parallel inside a chunk, recurrent across chunks; the "
              "step is built from exp(-a·Δ)",
    complexity="O(n·S·C) time for S states, O(S·C) state",
    find=find, runs_as=runs_as)
