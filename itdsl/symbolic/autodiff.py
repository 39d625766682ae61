"""Reverse-mode differentiation of plan expressions, symbolically.

`vjp` walks the expression DAG from its roots down, accumulating for every node
the expression of its cotangent. Elementwise partial derivatives come from
`derivatives` (sympy); the rules below are the tensor structure: dot products,
components, concatenation, MLP layers, spline bases. The result is more plan
expressions, sharing subexpressions with the forward ones (hash-consing), so a
backward pass recomputes what it needs instead of storing pair tensors.
"""

from __future__ import annotations

from . import pexpr as P
from .derivatives import partials
from .pexpr import Node


def unbroadcast(c: Node, shape: tuple[int, ...]) -> Node:
    """Cotangent `c` of a broadcast result, reduced to an argument of `shape`."""
    if c.shape == shape:
        return c
    if shape == ():
        return P.vsum(c)
    return broadcast(c, shape)


def broadcast(s: Node, shape: tuple[int, ...]) -> Node:
    """Scalar `s` as a value of `shape` (explicit, so later rules see the right shape)."""
    if s.shape == shape:
        return s
    if P.is_zero(s):
        return P.zeros(shape)
    return P.node("bcast", (s,), shape=shape)


def _local(n: Node, c: Node) -> list[tuple[Node, Node]]:
    """(child, contribution to the child's cotangent) for node `n` with cotangent `c`."""
    op, args = n.op, n.args
    if op == "where":  # the cotangent is masked too, so an overflow masked out stays out
        cond, a, b = args
        return [(a, unbroadcast(P.where(cond, c, P.ZERO), a.shape)),
                (b, unbroadcast(P.where(cond, P.ZERO, c), b.shape))]
    if op in P.ELEMENTWISE:
        return [(a, unbroadcast(P.mul(c, d), a.shape)) for a, d in zip(args, partials(n))
                if not P.is_zero(d)]
    if op == "dot":
        a, b = args
        return [(a, P.mul(c, b)), (b, P.mul(c, a))]
    if op == "sum":
        return [(args[0], broadcast(c, args[0].shape))]
    if op == "bcast":
        return [(args[0], P.vsum(c))]
    if op == "component":
        (a,) = args
        return [(a, P.onehot(c, n.attr("index"), a.shape[0]))]
    if op == "onehot":
        return [(args[0], P.component(c, n.attr("index")))]
    if op == "concat":
        out, lo = [], 0
        for part in args:
            w = part.shape[0] if part.shape else 1
            piece = P.vslice(c, lo, lo + w)
            out.append((part, piece if part.shape else P.component(c, lo)))
            lo += w
        return out
    if op == "slice":
        (a,) = args
        lo, hi = n.attrs
        width = a.shape[0]
        parts = [p for p in (P.zeros((lo,)) if lo else None, c,
                             P.zeros((width - hi,)) if hi < width else None) if p is not None]
        return [(a, P.concat(parts))]
    if op == "linear":
        W, a = args
        col, k, transpose = n.attrs
        cols = W.shape[1]
        if not transpose:  # out = W[:, col:col+k] @ a
            return [(a, _as_shape(P.linear(W, c, col, k, transpose=True), a.shape)),
                    (W, P.outer(c, _as_vector(a), col, cols))]
        # out = W[:, col:col+k].T @ a
        return [(a, P.linear(W, c, col)), (W, P.outer(a, c, col, cols))]
    if op == "basis":
        (u,) = args
        n_nodes, deriv = n.attrs
        return [(u, P.dot(c, P.basis(u, n_nodes, deriv + 1)))]
    return []  # leaves, zeros, outer: not differentiated further


def _as_vector(a: Node) -> Node:
    return a if a.shape else P.concat([a])


def _as_shape(v: Node, shape: tuple[int, ...]) -> Node:
    return v if shape else P.component(v, 0)


def vjp(seeds: list[tuple[Node, Node]]) -> dict[Node, Node]:
    """Cotangents of every node reachable from the seeds' roots, given (root, cotangent)."""
    cot: dict[Node, Node] = {}
    for root, c in seeds:
        cot[root] = P.add(cot[root], c) if root in cot else c
    for n in reversed(P.toposort([r for r, _ in seeds])):
        c = cot.get(n)
        if c is None or P.is_zero(c):
            continue
        for child, contrib in _local(n, c):
            if P.is_zero(contrib):
                continue
            cot[child] = P.add(cot[child], contrib) if child in cot else contrib
    return cot
