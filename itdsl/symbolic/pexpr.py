"""Plan expressions: the small tensor-expression language of Plans.

A `Node` is immutable and hash-consed (built through `node()`, so two equal
expressions are the same object): sharing is structural, which is common-
subexpression elimination for free, and equality/hashing cost O(1).

Every node has a `shape` (`()` scalar, `(C,)` vector, `(R, C)` matrix) and the
set `deps` of the sides it depends on: "x" (the output's points), "y0", "y1", ...
(the points of an integral's space) — this labelling is what hoisting reads.

ops (attrs in brackets):
    const [value]                         a number
    coord [side, var]                     the coordinate of the side's point of variable var
                                          (a side is the product of its variables' domains)
    pos [side, var]                       the position of that point on each axis of var's
                                          domain (integers from 0; a vector for several axes)
    field [name, side]                    an input field at the side's point (the field lives
                                          on exactly the side's domains, read at its variables)
    read(i_1, ..., i_k) [name]            an input field at the integer point (i_1, ..., i_k)
                                          of its axes, 0 outside them (zero padding)
    weight [side, var]                    the quadrature weight of var's rule at the point
    param [name]                          a learnable tensor (R, R^C, mlp weights, spline coefs)
    ref [name, side]                      the result of an earlier step of the program
    cot [name, side]                      a cotangent fed to a backward program
    <Fn>                                  elementwise (scalars broadcast): the functions of
                                          `itdsl.functions` (the ir.Fn names plus sign, erf,
                                          where(cond, a, b))
    dot(a, b), sum(a)                     channel reductions -> scalar
    component(a) [i]                      a[i]
    onehot(s) [i, width]                  the vector with s at i, 0 elsewhere
    concat(a, b, ...), slice(a) [lo, hi]
    linear(W, a) [col, k, transpose]      W[:, col:col+k] @ a   (transpose: W[:, col:col+k].T @ a)
    outer(a, b) [col, cols]               a (x) b at columns col.. of a matrix of `cols` columns
    basis(u) [n, deriv]                   the n cubic-convolution weights of the nodes k/(n-1) at u
                                          (their derivatives in u if deriv=1): a spline with
                                          coefficients C is basis(u).C, or basis(u).(C basis(v))
    bcast(s) / zeros                      a scalar broadcast to the node's shape / a zero tensor
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from enum import StrEnum

from ..functions import FUNCTIONS


class Op(StrEnum):
    """The structural ops (the elementwise ones are the names of `itdsl.functions`). A
    StrEnum: `Op.REF == "ref"`, so a node built from either is the same node."""

    CONST = "const"
    COORD = "coord"
    POS = "pos"
    FIELD = "field"
    READ = "read"
    WEIGHT = "weight"
    PARAM = "param"
    REF = "ref"
    COT = "cot"
    DOT = "dot"
    SUM = "sum"
    COMPONENT = "component"
    ONEHOT = "onehot"
    CONCAT = "concat"
    SLICE = "slice"
    LINEAR = "linear"
    OUTER = "outer"
    BASIS = "basis"
    BCAST = "bcast"
    ZEROS = "zeros"


# each op's attrs, by name, in order: `n.attr("col")`, and `n.name`, `n.side`, `n.value`
ATTRS: dict[str, tuple[str, ...]] = {
    Op.CONST: ("value",), Op.COORD: ("side", "var"), Op.POS: ("side", "var"),
    Op.FIELD: ("name", "side"), Op.READ: ("name",),
    Op.WEIGHT: ("side", "var"), Op.PARAM: ("name",), Op.REF: ("name", "side"),
    Op.COT: ("name", "side"), Op.COMPONENT: ("index",), Op.ONEHOT: ("index", "width"),
    Op.SLICE: ("lo", "hi"), Op.LINEAR: ("col", "k", "transpose"), Op.OUTER: ("col", "cols"),
    Op.BASIS: ("nodes", "deriv"),
}
ELEMENTWISE = frozenset(FUNCTIONS)
LEAVES = frozenset({Op.CONST, Op.COORD, Op.POS, Op.FIELD, Op.WEIGHT, Op.PARAM, Op.REF, Op.COT})


class Node:
    __slots__ = ("op", "args", "attrs", "shape", "deps", "_hash", "__weakref__")

    op: str
    args: tuple[Node, ...]
    attrs: tuple
    shape: tuple[int, ...]
    deps: frozenset[str]

    def __eq__(self, other):
        return self is other or (isinstance(other, Node) and self._hash == other._hash
                                 and self.op == other.op and self.attrs == other.attrs
                                 and self.shape == other.shape and self.args == other.args)

    def __hash__(self):
        return self._hash

    def __reduce__(self):  # unpickled nodes are interned again
        return (node, (self.op, self.args, self.attrs, self.shape, self.deps))

    def __repr__(self):
        from .show import show
        return f"<{show(self)} : {self.shape}>"

    # conveniences for building expressions in Python
    def __add__(self, o): return add(self, _lift(o))
    def __radd__(self, o): return add(_lift(o), self)
    def __sub__(self, o): return sub(self, _lift(o))
    def __rsub__(self, o): return sub(_lift(o), self)
    def __mul__(self, o): return mul(self, _lift(o))
    def __rmul__(self, o): return mul(_lift(o), self)
    def __truediv__(self, o): return div(self, _lift(o))
    def __rtruediv__(self, o): return div(_lift(o), self)
    def __neg__(self): return neg(self)

    @property
    def is_const(self) -> bool:
        return self.op == "const"

    def attr(self, key: str):
        """The attr `key` of this node's op (see `ATTRS`)."""
        return self.attrs[ATTRS[self.op].index(key)]

    @property
    def value(self) -> float:
        """A const's number."""
        return self.attr("value")

    @property
    def name(self) -> str:
        """The name a field, param, ref or cot reads."""
        return self.attr("name")

    @property
    def side(self) -> str | None:
        """The side a coord, field, weight, ref or cot is at (None: a per-call value)."""
        return self.attr("side")

    @property
    def var(self) -> str:
        """The variable a coord, pos or weight belongs to."""
        return self.attr("var")


_INTERN: weakref.WeakValueDictionary[tuple, Node] = weakref.WeakValueDictionary()


def node(op: str, args: Iterable[Node] = (), attrs: tuple = (), shape: tuple[int, ...] = (),
         deps: frozenset[str] | None = None) -> Node:
    """The one constructor: returns the existing node if an equal one is alive."""
    args = tuple(args)
    if len(attrs) != len(ATTRS.get(op, ())):
        raise ValueError(f"`{op}` takes the attrs {ATTRS.get(op, ())}, got {attrs}")
    if deps is None:
        deps = frozenset().union(*(a.deps for a in args)) if args else frozenset()
    key = (op, args, attrs, shape)
    found = _INTERN.get(key)
    if found is not None:
        return found
    n = Node.__new__(Node)
    n.op, n.args, n.attrs, n.shape, n.deps = op, args, attrs, shape, deps
    n._hash = hash(key)
    _INTERN[key] = n
    return n


# ---- leaves ------------------------------------------------------------------------------


def const(v: float) -> Node:
    v = float(v)
    if v == 0.0:
        v = 0.0  # one zero, not two
    return node("const", attrs=(v,))


ZERO, ONE = const(0.0), const(1.0)


def _lift(v) -> Node:
    return v if isinstance(v, Node) else const(v)


def coord(side: str, var: str, shape: tuple[int, ...]) -> Node:
    return node("coord", attrs=(side, var), shape=shape, deps=frozenset({side}))


def pos(side: str, var: str, axes: int) -> Node:
    """The positions of var's point on each of its domain's `axes` axes."""
    return node("pos", attrs=(side, var), shape=() if axes == 1 else (axes,),
                deps=frozenset({side}))


def field(name: str, side: str, shape: tuple[int, ...]) -> Node:
    return node("field", attrs=(name, side), shape=shape, deps=frozenset({side}))


def read(name: str, index: list[Node], shape: tuple[int, ...]) -> Node:
    """Field `name` at the integer point `index` (one scalar per axis of the field), 0 where
    an index is outside its axis."""
    if any(i.shape != () for i in index):
        raise ValueError("a read's indices are scalars, one per axis")
    return node("read", tuple(index), attrs=(name,), shape=shape)


def weight(side: str, var: str) -> Node:
    return node("weight", attrs=(side, var), deps=frozenset({side}))


def param(name: str, shape: tuple[int, ...]) -> Node:
    return node("param", attrs=(name,), shape=shape)


def ref(name: str, side: str | None, shape: tuple[int, ...]) -> Node:
    return node("ref", attrs=(name, side), shape=shape,
                deps=frozenset() if side is None else frozenset({side}))


def cot(name: str, side: str | None, shape: tuple[int, ...]) -> Node:
    return node("cot", attrs=(name, side), shape=shape,
                deps=frozenset() if side is None else frozenset({side}))


# ---- elementwise, with light algebraic folding ----------------------------------------------


def _bshape(*args: Node) -> tuple[int, ...]:
    shapes = {a.shape for a in args if a.shape != ()}
    if len(shapes) > 1:
        raise ValueError(f"shapes do not broadcast: {[a.shape for a in args]}")
    return shapes.pop() if shapes else ()


def ew(op: str, *args: Node) -> Node:
    """An elementwise node (constants folded where its entry says it is exact and safe)."""
    fold = FUNCTIONS[op].fold
    if fold is not None and all(a.is_const for a in args):
        try:
            return const(fold(*(a.value for a in args)))
        except (ValueError, OverflowError):
            pass
    return node(op, args, shape=_bshape(*args))


def add(a: Node, b: Node) -> Node:
    shape = _bshape(a, b)
    if is_zero(a) and b.shape == shape:
        return b
    if is_zero(b) and a.shape == shape:
        return a
    if a is b:
        return mul(const(2.0), a)
    ma, mb = masked(a), masked(b)
    if ma is not None and mb is not None and ma[0] is mb[0]:
        # where(c, u, 0) + where(c, v, 0) = where(c, u + v, 0): a product with the sum then
        # stays inside the mask (a cotangent masked to 0 times an infinite factor is 0)
        return where(ma[0], add(ma[1], mb[1]), ZERO)
    return ew("+", a, b)


def sub(a: Node, b: Node) -> Node:
    if is_zero(b) and a.shape == _bshape(a, b):
        return a
    if is_zero(a) and b.shape == _bshape(a, b):
        return neg(b)
    return ew("-", a, b)


def neg(a: Node) -> Node:
    if a.op == "neg":
        return a.args[0]
    return ew("neg", a)


BRACKETS = frozenset(name for name, f in FUNCTIONS.items() if f.condition is not None)


def mul(a: Node, b: Node) -> Node:
    shape = _bshape(a, b)
    if is_zero(a) or is_zero(b):
        return zeros(shape)
    # an Iverson bracket masks: [c] * e is e where c holds and 0 elsewhere, even where e
    # overflows (exp of a masked-out causal term must not turn 0 into inf * 0 = nan)
    if (a.op in BRACKETS) != (b.op in BRACKETS):
        cond, e = (a, b) if a.op in BRACKETS else (b, a)
        if e is ONE and cond.shape == shape:
            return cond
        if e.shape == shape:  # a constant too: k * [c] times a per-point value that is
            return where(cond, e, ZERO)  # inf where c fails (1/0 of an empty row) is 0
    for m, other in ((masked(a), b), (masked(b), a)):  # where(c, e, 0) * o = where(c, e * o, 0)
        if m is not None and other.op not in BRACKETS:
            return where(m[0], mul(m[1], other), ZERO)
    if a is ONE and b.shape == shape:
        return b
    if b is ONE and a.shape == shape:
        return a
    if a.is_const and a.value == -1.0 and b.shape == shape:
        return neg(b)
    if b.is_const and b.value == -1.0 and a.shape == shape:
        return neg(a)
    # scalars first: s1 * (s2 * v) = (s1 * s2) * v, so a product of several scalar factors
    # and one vector is one scalar (computed once per pair) times the vector
    if a.shape == () and shape != ():
        sv = _scalar_factor(b)
        if sv is not None:
            return mul(mul(a, sv[0]), sv[1])
    if b.shape == () and shape != ():
        sv = _scalar_factor(a)
        if sv is not None:
            return mul(mul(b, sv[0]), sv[1])
    return ew("*", a, b)


def div(a: Node, b: Node) -> Node:
    if b is ONE and a.shape == _bshape(a, b):
        return a
    if b.shape == () and b.deps < a.deps and not a.is_const:
        # a / b = a * (1/b) with b depending on fewer points than a: the reciprocal is
        # then computed once per point (or call), not a division per pair
        return mul(a, div(ONE, b))
    if b.is_const and b.value != 0.0 and a.shape == _bshape(a, b):
        return mul(a, const(1.0 / b.value))
    if is_zero(a) and a.shape == _bshape(a, b):
        return a
    return ew("/", a, b)


def power(a: Node, c: float) -> Node:
    """a^c for a constant c (0, 1 and 2 written out)."""
    if c == 0:
        return ONE
    if c == 1:
        return a
    if c == 2:
        return mul(a, a)
    return ew("^", a, const(c))


def zeros(shape: tuple[int, ...]) -> Node:
    """A zero of the given shape (a broadcast scalar zero for vectors)."""
    return ZERO if shape == () else node("zeros", attrs=(), shape=shape)


def is_zero(a: Node) -> bool:
    return a is ZERO or a.op == "zeros"


def where(cond: Node, a: Node, b: Node) -> Node:
    if is_zero(a) and is_zero(b):
        return zeros(_bshape(cond, a, b))
    return node("where", (cond, a, b), shape=_bshape(cond, a, b))


def factors(n: Node) -> list[Node]:
    """The factors of a product; a masked value where(c, e, 0) counts as c times e."""
    if n.op == "*":
        return factors(n.args[0]) + factors(n.args[1])
    m = masked(n)
    if m is not None:
        return [m[0]] + factors(m[1])
    return [n]


def masked(n: Node) -> tuple[Node, Node] | None:
    """(cond, e) if n is where(cond, e, 0): a bracket times e."""
    if n.op == "where" and is_zero(n.args[2]):
        return n.args[0], n.args[1]
    return None


# ---- structure ----------------------------------------------------------------------------------


def _scalar_factor(a: Node) -> tuple[Node, Node] | None:
    """(s, v) if `a` is s * v with s a scalar and v a vector."""
    if a.op == "*" and a.shape != ():
        u, v = a.args
        if u.shape == () and v.shape == a.shape:
            return u, v
        if v.shape == () and u.shape == a.shape:
            return v, u
    return None


def dot(a: Node, b: Node) -> Node:
    if a.shape != b.shape:
        raise ValueError(f"dot of shapes {a.shape} and {b.shape}")
    if a.shape == ():
        return mul(a, b)
    if is_zero(a) or is_zero(b):
        return ZERO
    for x, y in ((a, b), (b, a)):  # where(c, u, 0).v = where(c, u.v, 0), c a scalar: the
        m = masked(x)  # mask stays outermost (see `add`)
        if m is not None and m[0].shape == ():
            return where(m[0], dot(m[1], y), ZERO)
    for x, y in ((a, b), (b, a)):  # (s u).v = s (u.v): a scalar leaves the channel loop
        sv = _scalar_factor(x)
        if sv is not None:
            return mul(sv[0], dot(sv[1], y))
    if a.op == "bcast":
        return mul(a.args[0], vsum(b))
    if b.op == "bcast":
        return mul(b.args[0], vsum(a))
    return node("dot", (a, b))


def vsum(a: Node) -> Node:
    if a.shape == ():
        return a
    if is_zero(a):
        return ZERO
    m = masked(a)
    if m is not None and m[0].shape == ():  # sum(where(c, v, 0)) = where(c, sum(v), 0)
        return where(m[0], vsum(m[1]), ZERO)
    sv = _scalar_factor(a)
    if sv is not None:  # sum(s v) = s sum(v)
        return mul(sv[0], vsum(sv[1]))
    if a.op == "*" and a.args[0].shape == a.args[1].shape:  # sum(u v) = u.v
        return dot(*a.args)
    if a.op == "bcast":
        return mul(const(float(a.shape[0])), a.args[0])
    return node("sum", (a,))


def component(a: Node, i: int) -> Node:
    if a.op == "onehot":
        return a.args[0] if a.attr("index") == i else ZERO
    if is_zero(a):
        return ZERO
    return node("component", (a,), attrs=(i,))


def onehot(s: Node, i: int, width: int) -> Node:
    if s is ZERO:
        return zeros((width,))
    return node("onehot", (s,), attrs=(i, width), shape=(width,))


def concat(parts: list[Node]) -> Node:
    if len(parts) == 1:
        return parts[0] if parts[0].shape != () else node("concat", tuple(parts), shape=(1,))
    width = sum(p.shape[0] if p.shape else 1 for p in parts)
    return node("concat", tuple(parts), shape=(width,))


def vslice(a: Node, lo: int, hi: int) -> Node:
    """a[lo:hi] (a scalar if the slice has one element and `a` was built from scalars)."""
    if a.op == "concat":
        off = 0
        for p in a.args:
            w = p.shape[0] if p.shape else 1
            if off == lo and off + w == hi:
                return p
            off += w
    if is_zero(a):
        return zeros((hi - lo,))
    return node("slice", (a,), attrs=(lo, hi), shape=(hi - lo,))


def linear(W: Node, a: Node, col: int = 0, k: int | None = None, transpose: bool = False) -> Node:
    """W[:, col:col+k] @ a, or with `transpose` W[:, col:col+k].T @ a (then `k` is required)."""
    if not transpose:
        k = a.shape[0] if a.shape else 1
    out = k if transpose else W.shape[0]
    if is_zero(a):
        return zeros((out,))
    return node("linear", (W, a), attrs=(col, k, transpose), shape=(out,))


def outer(a: Node, b: Node, col: int, cols: int) -> Node:
    rows = a.shape[0] if a.shape else 1
    return node("outer", (a, b), attrs=(col, cols), shape=(rows, cols))


def basis(u: Node, n: int, deriv: int = 0) -> Node:
    """The interpolation weights of the n spline nodes at scalar u (see docs/language.md)."""
    return node("basis", (u,), attrs=(n, deriv), shape=(n,))


# ---- traversal -----------------------------------------------------------------------------------


def toposort(roots: Iterable[Node]) -> list[Node]:
    """Every node reachable from `roots`, children before parents (iterative)."""
    out: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(r, False) for r in roots]
    while stack:
        n, expanded = stack.pop()
        if expanded:
            out.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        stack.extend((a, False) for a in reversed(n.args) if id(a) not in seen)
    return out


def substitute(roots: list[Node], mapping: dict[Node, Node]) -> list[Node]:
    """`roots` with every node in `mapping` replaced (bottom-up rebuild)."""
    memo: dict[Node, Node] = {}
    for n in toposort(roots):
        if n in mapping:
            memo[n] = mapping[n]
        elif n.args:
            new_args = tuple(memo[a] for a in n.args)
            memo[n] = n if all(x is y for x, y in zip(new_args, n.args)) else rebuild(n, new_args)
        else:
            memo[n] = n
    return [memo[r] for r in roots]


def rebuild(n: Node, args: tuple[Node, ...]) -> Node:
    """A node like `n` over new children (re-running the folding rules)."""
    op = n.op
    folding = {"+": add, "-": sub, "*": mul, "/": div, "neg": neg, "dot": dot, "sum": vsum}
    if op in folding:
        return folding[op](*args)
    if op == "component":
        return component(args[0], n.attr("index"))
    if op in ELEMENTWISE:
        return ew(op, *args)
    return node(op, args, attrs=n.attrs, shape=n.shape)


# ---- cost -------------------------------------------------------------------------------------


def _width(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def node_cost(n: Node) -> int:
    """Arithmetic operations to compute `n` from its children, once."""
    if n.op in LEAVES or n.op in ("zeros", "concat", "slice", "component", "onehot"):
        return 0
    if n.op == "read":  # the flat index, the bounds test, the load
        return 3 * len(n.args)
    if n.op in ELEMENTWISE:
        return FUNCTIONS[n.op].cost * _width(n.shape)
    if n.op == "dot":
        return 2 * _width(n.args[0].shape) - 1
    if n.op == "sum":
        return _width(n.args[0].shape) - 1
    if n.op == "linear":
        W, a = n.args
        k = _width(a.shape)
        return 2 * k * _width(n.shape)
    if n.op == "outer":
        return _width(n.shape)
    if n.op == "basis":
        return 12 * n.shape[0]
    return 1


def cost(roots: Iterable[Node], where=lambda n: True) -> int:
    """Operations to compute `roots` once, shared subexpressions counted once, restricted to
    nodes for which `where(node)` holds (e.g. those that depend on both sides)."""
    return sum(node_cost(n) for n in toposort(roots) if where(n))
