"""The quadrature rules (docs/language.md, "Integrals"): the weights w_j of
integral(y: Y) f(y) = Σ_j w_j · f(y_j), and where the y_j are."""

from __future__ import annotations

import numpy as np

from .entry import Arg, Rule

MAX_NODES = 1024  # of a rule with nodes of its own
MAX_SAMPLES = 1 << 24


def _riemann(d, m: int) -> np.ndarray:
    """The left Riemann sum: h for j < m − 1, 0 for the last point."""
    h = (d.hi - d.lo) / (m - 1)
    w = np.full(m, h)
    w[-1] = 0.0
    return w


def _trapezoid(d, m: int) -> np.ndarray:
    h = (d.hi - d.lo) / (m - 1)
    w = np.full(m, h)
    w[0] = w[-1] = h / 2
    return w


def _simpson(d, m: int) -> np.ndarray:
    """Simpson's 1/3 rule on an even number of intervals; with an odd number, the last three
    intervals take Simpson's 3/8 rule (m = 2: the trapezoid)."""
    if m < 4 and m % 2 == 0:
        return _trapezoid(d, m)
    h = (d.hi - d.lo) / (m - 1)
    w = np.zeros(m)
    k = m if m % 2 == 1 else m - 3
    if k >= 3:
        w[:k:2] += 2 * h / 3
        w[1:k:2] += 4 * h / 3
        w[0] -= h / 3
        w[k - 1] -= h / 3
    if k != m:
        w[k - 1:] += 3 * h / 8 * np.array([1, 3, 3, 1])
    return w


def _gauss(d, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n-point Gauss–Legendre nodes and weights, mapped from [−1, 1] to [a, b]."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (d.lo + d.hi) / 2 + (d.hi - d.lo) / 2 * x, (d.hi - d.lo) / 2 * w


def _midpoint(d, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The centres a + (i + 1/2)·(b − a)/n of n equal cells of [a, b], each weighted (b − a)/n."""
    h = (d.hi - d.lo) / n
    return d.lo + (np.arange(n) + 0.5) * h, np.full(n, h)


RULES = [
    Rule(name="sum", weights=lambda d, m: np.ones(m), unit=True),
    Rule(name="mean", weights=lambda d, m: np.full(m, 1.0 / max(m, 1)),
         empty="the mean over no points is undefined"),
    Rule(name="weights", from_input=True, zeros=True,
         args=(Arg(field="weights", kind="field", what="the weights field", placeholder="w"),)),
    Rule(name="riemann", kinds=frozenset({"grid"}), weights=_riemann, zeros=True),
    Rule(name="trapezoid", kinds=frozenset({"grid"}), weights=_trapezoid),
    Rule(name="simpson", kinds=frozenset({"grid"}), weights=_simpson),
    Rule(name="gauss", kinds=frozenset({"grid"}), nodes=_gauss,
         args=(Arg(field="n", kind="count", what="the number of nodes", placeholder="n",
                   limit=MAX_NODES, noun="the number of Gauss nodes"),)),
    Rule(name="midpoint", kinds=frozenset({"grid"}), nodes=_midpoint,
         args=(Arg(field="n", kind="count", what="the number of cells", placeholder="n",
                   limit=MAX_NODES, noun="the number of midpoint cells"),)),
    # S indices drawn with replacement, uniformly or ∝ the importance, each weighted
    # μ_j / (S·p_j), μ the domain's measure (runtime/sampling.py draws them); a point not
    # drawn is not in the sum, as if the integral ran over the S draws only
    Rule(name="montecarlo", kinds=frozenset({"points", "index"}), sampled=True, zeros=True,
         drops=True,
         empty="no point can be sampled from it",
         args=(Arg(field="samples", kind="count", what="the number of samples", placeholder="S",
                   limit=MAX_SAMPLES),
               Arg(field="importance", kind="density", what="the sampling density",
                   placeholder="EXPR", keyword="importance"))),
]
