"""Random well-typed `.it` programs for the differential fuzzer.

`generate(seed)` draws one operator from `random.Random(seed)`: either a program over the
whole language (every domain kind, quadrature, param type, built-in, bracket, kernel
declarations, normalised ratios, several integrals) or one shaped like a fast strategy's
form (attention, recurrence, causal low rank, convolution, low rank, matmul), so those
strategies run too. The same seed always gives the same text.

Expressions are built by width (None: a scalar, an int: a vector of that width) from what
is in scope, so nearly every program checks; the few that do not are skipped (counted).
Magnitudes are kept sane by default (exp of a bounded argument, log and sqrt of positive
ones, denominators away from 0); now and then the raw form is used, so that NaN and inf
come out of the program itself as well as from special input values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from itdsl.domains import RULES, rules_on
from itdsl.functions import ACTIVATIONS, FUNCTIONS

# The functions written `name(args)` come from the table (itdsl/functions/), so that a new one
# is fuzzed without editing this file; its order is the table's, fixed, so seeds stay
# reproducible. Functions that cannot be generated well-typed would be listed here, each with
# why (none today). The arithmetic infix operators (+ - * / ^, prefix -) have hand-written
# forms below (guarded denominators and bases); `internal` entries (erf, sign, where) have no
# syntax in `.it`.
EXCLUDED: dict[str, str] = {}
CALLS = [f for f in FUNCTIONS.values()
         if f.syntax == "call" and f.condition is None and f.name not in EXCLUDED]
UNARY = tuple(f.name for f in CALLS if f.arity == 1)  # exp, log, ..., atan, ..., softplus
BINARY = tuple(f.name for f in CALLS if f.arity == 2)  # min, max
CMPS = tuple(f.name for f in FUNCTIONS.values() if f.condition == "compare")
LOGIC = tuple(f.name for f in FUNCTIONS.values() if f.condition == "logic")  # and, or
CONSTS = ("0.5", "2", "1.5", "0.3", "3", "pi", "1e-3", "0.25")
RAW = 0.12  # how often a function gets its argument unguarded (NaN and inf on purpose)


@dataclass(frozen=True)
class Generated:
    """One generated operator."""

    seed: int
    family: str
    name: str
    text: str


@dataclass
class _Kernel:
    xdom: str
    ydom: str
    width: int | None
    field_sides: frozenset[int]  # which arguments (0, 1) the body reads fields at


@dataclass
class _Decls:
    """What the operator being generated has declared."""

    domains: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # kind, dim
    inputs: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # domain, width
    reals: dict[str, int | None] = field(default_factory=dict)  # R / R^C params
    mlps: dict[str, tuple[int, ...]] = field(default_factory=dict)
    splines: dict[str, int] = field(default_factory=dict)  # name -> number of arguments
    kernels: dict[str, _Kernel] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


class _Gen:
    """Builds one program; `self.r` is the only source of randomness."""

    def __init__(self, r: random.Random):
        self.r = r
        self.d = _Decls()

    # ---- declarations -------------------------------------------------------------------
    def domain(self, name: str, kind: str | None = None, dim: int | None = None) -> str:
        kind = kind or self.r.choice(("points", "points", "grid", "index", "index"))
        if kind == "points":
            dim = dim or self.r.choice((1, 2, 3))
            self.d.lines.append(f"domain {name} = points({dim})")
            self.vector_param(dim)
        elif kind == "grid":
            lo, hi = self.r.choice((("0", "1"), ("-1", "1"), ("0", "pi"), ("0.5", "2"),
                                    ("-2", "-0.5")))
            self.d.lines.append(f"domain {name} = grid({lo}, {hi})")
        else:
            self.d.lines.append(f"domain {name} = index")
        self.d.domains[name] = (kind, dim)
        return name

    def input(self, name: str, dom: str, width: int | None) -> str:
        self.d.lines.append(f"input  {name} : {dom} -> {_type(width)}")
        self.d.inputs[name] = (dom, width)
        if width is not None:
            self.vector_param(width)
        return name

    def real(self, name: str, width: int | None, init: str | None = None) -> str:
        if init is None:
            init = self.r.choice(("", " = 0.5", " = -0.7", " = normal(0.3)",
                                  " = uniform(-1, 1)", " = 1.2"))
        self.d.lines.append(f"param  {name} : {_type(width)}{init}")
        self.d.reals[name] = width
        return name

    def vector_param(self, width: int) -> str:
        """A param `R^width` (so that every vector width has a leaf everywhere)."""
        for name, w in self.d.reals.items():
            if w == width:
                return name
        return self.real(f"a{width}", width)

    def mlp(self, name: str, sizes: tuple[int, ...]) -> str:
        act = self.r.choice(ACTIVATIONS)
        init = self.r.choice(("", "", " = normal(0.5)", " = uniform(-0.7, 0.7)"))
        self.d.lines.append(f"param  {name} : mlp({' -> '.join(map(str, sizes))}, "
                            f"act = {act}){init}")
        self.d.mlps[name] = sizes
        if sizes[-1] > 1:
            self.vector_param(sizes[-1])
        return name

    def spline(self, name: str, nargs: int) -> str:
        sizes = ", ".join(str(self.r.randint(2, 6)) for _ in range(nargs))
        init = self.r.choice(("", " = normal(1)"))
        self.d.lines.append(f"param  {name} : spline({sizes}){init}")
        self.d.splines[name] = nargs
        return name

    def kernel(self, name: str, xdom: str, ydom: str, width: int | None, body: str | None = None,
               field_sides: frozenset[int] | None = None) -> str:
        if width is not None:
            self.vector_param(width)
        if body is None:
            body = self.expr(width, {"x": xdom, "y": ydom}, 2)
            field_sides = frozenset(i for i, v in enumerate("xy") if f"({v})" in body)
        self.d.lines.append(f"kernel {name}(x: {xdom}, y: {ydom}) = {body}")
        sides = frozenset({0, 1}) if field_sides is None else field_sides
        self.d.kernels[name] = _Kernel(xdom, ydom, width, sides)
        return name

    def text(self, name: str, output: str) -> str:
        body = "\n".join("    " + line for line in self.d.lines + [output])
        return f"operator {name} {{\n{body}\n}}\n"

    # ---- expressions ----------------------------------------------------------------------
    def pick(self, *options):
        return self.r.choice(options)

    def leaves(self, width: int | None, scope: dict[str, str], fieldless: frozenset[str]):
        out = []
        for v, dom in scope.items():
            kind, dim = self.d.domains[dom]
            if kind == "points":
                if dim == width:
                    out.append(v)
                if width is None:
                    out += [f"{v}[{self.r.randrange(dim)}]", f"norm({v})", f"sum({v})"]
            elif width is None:
                out.append(v if kind == "grid" else f"{v} / 4")
            if v in fieldless:
                continue
            out += [f"{f}({v})" for f, (fd, w) in self.d.inputs.items()
                    if fd == dom and w == width]
        out += [p for p, w in self.d.reals.items() if w == width]
        if width is None:
            out.append(self.pick(*CONSTS))
        return out

    def expr(self, width: int | None, scope: dict[str, str], depth: int,
             fieldless: frozenset[str] = frozenset()) -> str:
        """An expression of `width` over the point variables of `scope` (var -> domain)."""
        if width is not None:
            self.vector_param(width)
        leaves = self.leaves(width, scope, fieldless)
        if depth <= 0 or self.r.random() < 0.25:
            return self.r.choice(leaves)
        sub = depth - 1

        def e(w=width, s=scope):
            return self.expr(w, s, sub, fieldless)

        kinds = ["unary", "unary", "binary", "binary", "div", "neg", "pow", "minmax",
                 "bracket", "mlp", "kernel"]
        if width is None:
            kinds += ["reduce", "reduce", "component", "spline"]
        kind = self.r.choice(kinds)
        if kind == "unary":
            return self.unary(self.r.choice(UNARY), e())
        if kind == "binary":
            a, b = e(), e(self.pick(width, None))
            a, b = (a, b) if self.r.random() < 0.5 else (b, a)
            return f"({a} {self.pick('+', '-', '*')} {b})"
        if kind == "div":
            den = e(self.pick(width, None))
            den = den if self.r.random() < RAW else f"(1 + ({den})^2)"
            return f"({e()} / {den})"
        if kind == "neg":
            return f"-{_atom(e())}"
        if kind == "pow":
            exp = self.pick("2", "3", "2", "0.5", "-1", "(-2)", "1.5")
            reals = [p for p, w in self.d.reals.items() if w is None]
            if reals and self.r.random() < 0.2:
                exp = self.r.choice(reals)
            base = e()
            if exp in ("0.5", "1.5", "-1", "(-2)") or exp in reals:
                base = base if self.r.random() < RAW else f"(abs({base}) + 0.5)"
            return f"{_atom(base)}^{exp}"
        if kind == "minmax":
            return f"{self.r.choice(BINARY)}({e()}, {e(self.pick(width, None))})"
        if kind == "bracket":
            return f"[{self.condition(scope, sub, fieldless)}] * {_atom(e())}"
        if kind == "reduce":
            w = self.vector_width()
            fn = self.pick("dot", "norm", "sqnorm", "sum")
            return f"dot({e(w)}, {e(w)})" if fn == "dot" else f"{fn}({e(w)})"
        if kind == "component":
            w = self.vector_width()
            return f"{_atom(e(w))}[{self.r.randrange(w)}]"
        if kind == "spline" and self.d.splines:
            name = self.r.choice(sorted(self.d.splines))
            args = [self.unit(e(None)) for _ in range(self.d.splines[name])]
            return f"{name}({', '.join(args)})"
        if kind == "mlp":
            call = self.mlp_call(width, scope, sub, fieldless)
            if call:
                return call
        if kind == "kernel":
            call = self.kernel_call(width, scope, fieldless)
            if call:
                return call
        return self.r.choice(leaves)

    def unary(self, fn: str, arg: str) -> str:
        # keep the argument where the function is tame (the others are tame everywhere)
        if self.r.random() >= RAW:
            if fn == "exp":
                arg = self.pick(f"-({arg})^2", f"tanh({arg})", f"-abs({arg})", f"{arg} / 4")
            elif fn in ("log", "sqrt"):
                arg = self.pick(f"({arg})^2 + 0.5", f"abs({arg}) + 0.1", f"exp({arg} / 8)")
        return f"{fn}({arg})"

    def unit(self, arg: str) -> str:
        """A scalar in [0, 1] (a spline's argument; splines clamp, so raw is fine too)."""
        return self.pick(f"sigmoid({arg})", arg, f"abs(sin({arg}))")

    def vector_width(self) -> int:
        """A width some param has (declaring one if none does)."""
        widths = sorted(w for w in self.d.reals.values() if w is not None)
        if not widths:
            widths = [self.r.randint(1, 3)]
            self.vector_param(widths[0])
        return self.r.choice(widths)

    def condition(self, scope: dict[str, str], depth: int, fieldless: frozenset[str]) -> str:
        def side():
            return self.expr(None, scope, min(depth, 1), fieldless)
        first = f"{side()} {self.r.choice(CMPS)} {side()}"
        if self.r.random() < 0.2:  # a chain
            first += f" {self.pick('<', '<=')} {side()}"
        parts = [first]
        while self.r.random() < 0.3:
            parts += [self.r.choice(LOGIC), f"{side()} {self.r.choice(CMPS)} {side()}"]
        if self.r.random() < 0.1 and len(parts) > 1:
            return f"({' '.join(parts[:3])}) {' '.join(parts[3:])}".strip()
        return " ".join(parts)

    def mlp_call(self, width: int | None, scope: dict[str, str], depth: int,
                 fieldless: frozenset[str]) -> str | None:
        fits = [n for n, s in self.d.mlps.items() if (None if s[-1] == 1 else s[-1]) == width]
        if not fits:
            return None
        name = self.r.choice(fits)
        need, args = self.d.mlps[name][0], []
        while need > 0:
            widths = sorted({w for w in self.d.reals.values() if w is not None and w <= need})
            w = self.r.choice(widths + [None, None])
            args.append(self.expr(w, scope, min(depth, 1), fieldless))
            need -= w or 1
        return f"{name}({', '.join(args)})"

    def kernel_call(self, width: int | None, scope: dict[str, str],
                    fieldless: frozenset[str]) -> str | None:
        calls = []
        for name, k in self.d.kernels.items():
            if k.width != width:
                continue
            for a, ad in scope.items():
                for b, bd in scope.items():
                    reads = {i for i, v in enumerate((a, b)) if v in fieldless}
                    if (ad, bd) == (k.xdom, k.ydom) and not reads & k.field_sides:
                        calls.append(f"{name}({a}, {b})")
        return self.r.choice(calls) if calls else None

    # ---- integrals and outputs --------------------------------------------------------------
    def quadrature(self, ydom: str) -> tuple[str, bool]:
        """A `with` clause (possibly empty) for an integral over `ydom`, from the rules of
        `itdsl.domains` that apply to its kind; and whether the integrand must read no field
        on it (a rule with nodes of its own, such as gauss, evaluates it there)."""
        kind = self.d.domains[ydom][0]
        names = ["", ""] if kind != "grid" else [""]  # (the default rule, more often)
        for rule in rules_on(kind):
            names.append(rule.name)
            if "importance" in rule.options:
                names.append(rule.name + "+importance")
        name = self.r.choice(names)
        if not name:
            return "", False
        rule = RULES[name.removesuffix("+importance")]
        if rule.from_input:
            w = next((f for f, (d, _) in self.d.inputs.items()
                      if f.startswith("w") and d == ydom), None)
            w = w or self.input(f"w{len(self.d.inputs)}", ydom, None)
            return f" with {rule.name}({w})", False
        if rule.own_nodes:
            return f" with {rule.name}({self.r.randint(1, 6)})", True
        if rule.sampled and name.endswith("+importance"):
            imp = self.expr(None, {"y": ydom}, 1)
            imp = self.pick(f"exp(tanh({imp}))", f"({imp})^2 + 0.1", f"abs({imp}) + 1")
            return f" with {rule.name}({self.r.randint(2, 9)}, importance = {imp})", False
        if rule.sampled:
            return f" with {rule.name}({self.r.randint(1, 9)})", False
        return f" with {rule.name}", False

    def integrand(self, width: int | None, scope: dict[str, str], fieldless) -> str:
        """Factors: mostly a kernel of (x, y) (declared or not) times a value at y."""
        y = list(scope)[1]
        values = [lf for lf in self.leaves(width, {y: scope[y]}, fieldless) if "(" in lf]
        value = self.r.choice(values) if values and self.r.random() < 0.7 else \
            self.expr(width, scope, 2, fieldless)
        kernel = self.kernel_call(None, scope, fieldless) if self.r.random() < 0.6 else None
        factors = [value, kernel or self.expr(None, scope, 2, fieldless)]
        for _ in range(self.r.choice((0, 0, 1))):
            factors.append(self.expr(None, scope, 2, fieldless))
        if self.r.random() < 0.3:
            factors.append(f"[{self.pair_condition(scope)}]")
        self.r.shuffle(factors)
        return " * ".join(_atom(f) for f in factors)

    def pair_condition(self, scope: dict[str, str]) -> str:
        """A bracket on the pair (x, y): causal, a window, or on components."""
        (x, xd), (y, yd) = scope.items()
        xs, ys = self.scalar_of(x, xd), self.scalar_of(y, yd)
        return self.pick(f"{ys} <= {xs}", f"{ys} < {xs}", f"abs({xs} - {ys}) <= 2",
                         f"0 <= {xs} - {ys} < 3", f"{xs} != {ys}",
                         f"{ys} <= {xs} and {xs} - {ys} < 0.5 or {xs} == {ys}")

    def scalar_of(self, v: str, dom: str) -> str:
        kind, dim = self.d.domains[dom]
        return f"{v}[{self.r.randrange(dim)}]" if kind == "points" else v

    def integral(self, x: str, xdom: str, width: int | None) -> tuple[str, bool]:
        """An integral (or a normalised ratio of two) over a random domain; and whether it
        is open (no `with`: its integrand would swallow a following `*`)."""
        ydom = self.r.choice(sorted(self.d.domains))
        scope = {x: xdom, "y": ydom}
        quad, gauss = self.quadrature(ydom)
        if self.r.random() < 0.25 and not gauss:
            return self.ratio(x, xdom, ydom, width, quad), not quad
        fieldless = frozenset({"y"}) if gauss else frozenset()
        return f"integral(y: {ydom}) {self.integrand(width, scope, fieldless)}{quad}", not quad

    def ratio(self, x: str, xdom: str, ydom: str, width: int | None, quad: str) -> str:
        """A normalised integral ∫ e^s v / ∫ e^s, causal now and then (scalar coordinates)."""
        scope = {x: xdom, "y": ydom}
        score = self.expr(None, scope, 2)
        mask = ""
        scalar = "points" not in (self.d.domains[xdom][0], self.d.domains[ydom][0])
        if scalar and self.r.random() < 0.5:
            mask = f" * [y {self.pick('<=', '<')} {x}]"
        value = self.expr(width, scope, 1)
        return (f"integral(y: {ydom}) exp({score}) * {_atom(value)}{mask}{quad} / "
                f"integral(y: {ydom}) exp({score}){mask}{quad}")

    def term(self, x: str, xdom: str, width: int | None) -> str:
        if self.r.random() < 0.3:
            return self.expr(width, {x: xdom}, 2)
        i, open_ = self.integral(x, xdom, width)
        forms = [f"({i})", f"({i})", f"-({i})", f"2 * ({i})", f"({i}) / 3",
                 f"{_atom(self.expr(None, {x: xdom}, 1))} * ({i})", i, f"0.5 * {i}"]
        if open_:
            forms += [f"-{i}"]
        return self.r.choice(forms)

    def output(self, name: str, xdom: str, width: int | None, terms: int) -> str:
        parts = [self.term("x", xdom, width) for _ in range(terms)]
        text = parts[0]
        for p in parts[1:]:
            text = f"{_atom(p)} {self.pick('+', '-')} {text}"
        return f"output {name}(x: {xdom}) = {text}"


# ---- families: the whole language, and each fast strategy's form ------------------------------


def general(g: _Gen) -> str:
    """Any mix of domains, inputs, params, kernels and integrals."""
    r = g.r
    doms = [g.domain(n) for n in ("X", "Y", "Z")[:r.choice((1, 2, 2, 3))]]
    for name in ("f", "b", "v")[:r.choice((1, 1, 2, 3))]:
        g.input(name, r.choice(doms), r.choice((None, None, 1, 2, 3)))
    for k in range(r.choice((0, 1, 1, 2))):
        kind = r.choice(("real", "real", "mlp", "spline"))
        if kind == "real":
            g.real(f"c{k}", r.choice((None, None, 2)))
        elif kind == "mlp":
            sizes = [r.randint(1, 4)] + [r.randint(1, 4) for _ in range(r.choice((0, 1, 1, 2)))]
            g.mlp(f"phi{k}", (*sizes, r.choice((1, 1, 2, 3))))
        else:
            g.spline(f"S{k}", r.choice((1, 2)))
    for name in ("k", "h")[:r.choice((0, 0, 1, 2))]:
        g.kernel(name, r.choice(doms), r.choice(doms), r.choice((None, None, 1, 2)))
    width = r.choice((None, None, 1, 2, 3))
    if width is not None:
        g.vector_param(width)
    return g.text("general", g.output("o", r.choice(doms), width, r.choice((1, 1, 2, 3))))


def attention(g: _Gen) -> str:
    """exp(score) · v / Σ exp(score): plain q·k, scaled, with a position or bias term,
    causal or windowed on one index domain."""
    r = g.r
    causal = r.random() < 0.5
    dq, dv = r.choice((1, 2, 4, 8)), r.choice((None, 1, 2, 3))
    X = g.domain("T" if causal else "I", r.choice(("index", "index", "points", "grid"))
                 if not causal else r.choice(("index", "index", "grid")))
    Y = X if causal else g.domain("J", r.choice(("index", "points")))
    g.input("q", X, dq)
    g.input("k", Y, dq)
    g.input("v", Y, dv)
    score = g.pick("dot(q(x), k(y))", f"dot(q(x), k(y)) / {g.pick('2', '8', '0.5')}",
                   "-sqnorm(q(x) - k(y))", "dot(q(x), k(y)) * s")
    if "* s" in score:
        g.real("s", None, " = 0.7")
    if r.random() < 0.3 and "points" not in (g.d.domains[X][0], g.d.domains[Y][0]):
        g.real("m", None, " = 0.3")
        score += g.pick(" - m * abs(x - y)", " - m * (x - y)^2 / 8")
    if r.random() < 0.2:
        g.input("bias", Y, None)
        score += " + bias(y)"
    mask = ""
    if causal:
        mask = g.pick(" * [y <= x]", " * [y < x]", " * [y <= x and x - y < 3]")
    g.kernel("a", X, Y, None, f"exp({score}){mask}", frozenset({0, 1}))
    quad = g.pick("", "", " with sum", " with mean") if g.d.domains[Y][0] != "grid" else ""
    out = f"integral(y: {Y}) a(x, y) * v(y){quad} / integral(y: {Y}) a(x, y){quad}"
    if r.random() < 0.2:
        out = f"{out} + v(x)" if X == Y else f"q(x)[0] * ({out})"
    return g.text("attention", f"output o(x: {X}) = {out}")


def recurrence(g: _Gen) -> str:
    """A causal sum of decaying exponentials of t − s: a linear recurrence."""
    r = g.r
    T = g.domain("T", r.choice(("index", "index", "grid")))
    c = r.choice((None, 1, 2, 4))
    g.input("f", T, c)
    g.real("a", c if r.random() < 0.5 else None, g.pick(" = 0.5", " = 0.1", " = 1.3"))
    rate = g.pick("softplus(a)", "a^2", "(abs(a) + 0.05)")
    body = g.pick(f"exp(-{rate} * (x - y))",
                  f"(exp(-{rate} * (x - y)) + 0.5 * exp(-(x - y) / 3))",
                  f"exp(-{rate} * (x - y)) * cos(0.4 * (x - y))",
                  f"2 * exp({rate} * (y - x))")
    mask = g.pick("[y <= x]", "[y < x]", "[x >= y]")
    g.kernel("k", T, T, None, f"{body} * {mask}", frozenset())
    quad = ""
    if g.d.domains[T][0] == "grid":
        quad = g.pick("", " with riemann", " with sum")
    elif r.random() < 0.3:
        quad = f" with weights({g.input('w', T, None)})"
    out = f"integral(y: {T}) k(x, y) * f(y){quad}"
    if r.random() < 0.3:
        out = g.pick(f"f(x) + {out}", f"-{out}", f"({out}) * 0.5")
    return g.text("recurrence", f"output o(x: {T}) = {out}")


def causal_lowrank(g: _Gen) -> str:
    """dot(φ(q(t)), φ(k(s))) · [s <= t]: causal linear attention, plain or normalised."""
    r = g.r
    T = g.domain("T", "index")
    d = r.choice((1, 2, 4))
    g.input("q", T, d)
    g.input("k", T, d)
    g.input("v", T, r.choice((None, 2, 3)))
    phi = g.pick("softplus", "exp", "sigmoid")
    mask = g.pick("[y <= x]", "[y < x]")
    g.kernel("a", T, T, None, f"dot({phi}(q(x)), {phi}(k(y))) * {mask}", frozenset({0, 1}))
    if r.random() < 0.5:
        out = f"integral(y: {T}) a(x, y) * v(y) / integral(y: {T}) a(x, y)"
    else:
        out = f"integral(y: {T}) a(x, y) * v(y)"
    return g.text("causal_lowrank", f"output o(x: {T}) = {out}")


def convolution(g: _Gen) -> str:
    """A kernel of t − s on one grid or index domain, with compact support or global."""
    r = g.r
    T = g.domain("T", r.choice(("grid", "grid", "index")))
    grid = g.d.domains[T][0] == "grid"
    c = r.choice((None, 1, 3))
    g.input("f", T, c)
    g.real("w", c if r.random() < 0.4 else None, g.pick(" = 0.3", " = 0.15"))
    d = "(x - y)" if grid else "(x - y) / 3"
    body = g.pick(f"exp(-{d}^2 / (2 * w^2))", f"1 / (1 + {d}^2)", f"cos(w * {d})",
                  f"exp(-abs({d}) / (abs(w) + 0.1))", f"sigmoid({d} * w)")
    if r.random() < 0.25:
        g.mlp("phi", (1, r.randint(2, 4), 1))
        body = f"phi({d})"
    if r.random() < 0.5:  # compact support, edges off the grid points
        body += g.pick(" * [abs(x - y) <= 0.23]", " * [abs(x - y) < 0.37]") if grid else             g.pick(" * [abs(x - y) <= 2]", " * [-1 <= x - y <= 3]")
    g.kernel("k", T, T, None, body, frozenset())
    quad = g.pick("", " with trapezoid", " with simpson", " with riemann", " with sum")         if grid else g.pick("", " with mean")
    out = f"integral(y: {T}) k(x, y) * f(y){quad}"
    if r.random() < 0.2:
        out = f"f(x) - {out}"
    return g.text("convolution", f"output o(x: {T}) = {out}")


def lowrank(g: _Gen) -> str:
    """A kernel that separates into Σ a_r(x) b_r(y): dot products, polynomials, features."""
    r = g.r
    d = r.choice((1, 2, 3))
    X = g.domain("X", "points", d)
    Y = g.domain("Y", "points", d)
    g.input("b", Y, r.choice((None, 1, 2, 4)))
    body = g.pick("dot(x, y)", "(dot(x, y) + 1)^2", "(dot(x, y) + c)^3", "sum(x) * sum(y) + 1",
                  "cos(c * (x[0] - y[0]))", "dot(phi(x), phi(y))", "exp(x[0] + y[0]) + dot(x, y)")
    if "c" in body.replace("cos", ""):
        g.real("c", None, " = 0.5")
    if "phi" in body:
        g.mlp("phi", (d, r.randint(2, 4), r.choice((2, 3))))
    g.kernel("k", X, Y, None, body, frozenset())
    quad = g.pick("", " with sum", " with mean", " with montecarlo(5)")
    if r.random() < 0.3:
        quad = f" with weights({g.input('w', Y, None)})"
    out = f"integral(y: {Y}) k(x, y) * b(y){quad}"
    if r.random() < 0.3:
        out = f"integral(y: {Y}) softplus(k(x, y)) * b(y){quad} / " \
              f"integral(y: {Y}) softplus(k(x, y)){quad}"
    return g.text("lowrank", f"output o(x: {X}) = {out}")


def matmul(g: _Gen) -> str:
    """A kernel of coordinates and params only, between two grids: a sampled matrix."""
    r = g.r
    U = g.domain("U", "grid")
    V = g.domain("V", "grid")
    c = r.choice((None, None, 2))
    g.input("f", V, c)
    kind = r.choice(("spline", "mlp", "gauss", "sin"))
    if kind == "spline":
        g.spline("W", 2)
        body = "W(x, y)"
    elif kind == "mlp":
        g.mlp("phi", (2, r.randint(2, 5), 1))
        body = "phi(x, y)"
    else:
        g.real("a", None, " = 1.5")
        body = "exp(-a * (x - y)^2)" if kind == "gauss" else "sin(a * x * y)"
    g.kernel("k", U, V, None, body, frozenset())
    quad = g.pick("", " with trapezoid", " with simpson", " with riemann")
    out = f"integral(y: {V}) k(x, y) * f(y){quad}"
    if r.random() < 0.4:
        g.spline("cb", 1)
        out = f"cb(x) + {out}"
    return g.text("matmul", f"output o(x: {U}) = {out}")


def lattice(g: _Gen) -> str:
    """Images: a stencil on an index(D) lattice, read at `p + t`, `p - t`, `p + t - 1` or a
    strided `2*q + t` (zero padding), depthwise (a field R^C, a kernel per channel) or with
    channels on grids mixed by the integral (an INN convolution: a spline per stencil point)."""
    r = g.r
    D = r.choice((1, 2, 2, 2, 3))
    sizes = [r.choice((1, 3, 3, 5)) for _ in range(D)]
    g.d.lines.append("domain P = " + ("index" if D == 1 else f"index({D})"))
    g.d.lines.append(f"domain T = stencil({', '.join(map(str, sizes))})")
    strided = r.random() < 0.25
    if strided:
        g.d.lines.append("domain Q = " + ("index" if D == 1 else f"index({D})"))
    out_var, out_dom = ("q", "Q") if strided else ("p", "P")
    at = (f"2*q + t{g.pick('', ' - 1')}" if strided else
          g.pick("p + t", "p + t", "p - t", "p + t - 1", "t + p + 1"))
    sq = "t^2" if D == 1 else g.pick("sqnorm(t)", "t[0]^2 + 2 * t[1]^2" if D > 1 else "t^2")
    if r.random() < 0.5:  # depthwise: a kernel per channel
        c = r.choice((None, 1, 2, 3))
        g.d.lines.append(f"input  f : P -> {_type(c)}")
        g.d.lines.append(f"param  w : {_type(c)} = {g.pick('1.0', '0.7', '1.5')}")
        k = g.pick(f"exp(-({sq}) / (2 * w^2))", f"w / (1 + {sq})",
                   f"sigmoid(w * ({'t' if D == 1 else 't[0]'}))")
        quad = g.pick("", "", " with sum", " with mean")
        out = f"integral(t: T) ({k}) * f({at}){quad}"
        if r.random() < 0.2 and not strided:
            out = f"f(p) - {out}"
        return g.text("lattice", f"output g({out_var}: {out_dom}) = {out}")
    g.d.lines.append("domain U = grid(0, 1)")
    g.d.lines.append(f"domain V = {g.pick('grid(0, 1)', 'grid(-1, 1)', 'index')}")
    g.d.lines.append("input  f : V * P -> R")
    n = r.randint(2, 5)
    g.d.lines.append(f"param  W : spline({n}, {n}, per = T){g.pick('', ' = normal(1)')}")
    vcoord = "v" if "grid" in g.d.lines[-3] else "v / 4"
    quad = g.pick("", " with (trapezoid, sum)", " with (simpson, sum)", " with (riemann, mean)") \
        if "grid" in g.d.lines[-3] else g.pick("", " with sum", " with (mean, sum)")
    out = f"integral(v: V, t: T) W(u, {vcoord}, t) * f(v, {at}){quad}"
    if r.random() < 0.5:
        g.d.lines.append(f"param  c : spline({r.randint(2, 5)})")
        out = f"c(u) + {out}"
    return g.text("lattice", f"output g(u: U, {out_var}: {out_dom}) = {out}")


# the domains of `product`: name -> (declaration, coordinate forms of a variable `{v}`)
PRODUCT_DOMAINS = {
    "G": ("grid(0, 1)", ("{v}",)),
    "S": ("grid((0, 1), (-1, 2))", ("{v}[0]", "{v}[1]", "sqnorm({v})")),
    "I": ("index", ("{v} / 4",)),
    "L": ("index(2)", ("{v}[0] / 3", "{v}[1] / 5")),
    "X": ("points(2)", ("{v}[0]", "norm({v})")),
    "K": ("stencil(3, 1)", ("{v}[0]", "{v}[1] + 1")),
}


def product(g: _Gen) -> str:
    """Outputs on products of domains, integrals over several variables with a rule each,
    fields on products read at variables of either side, tensor-product grids (gauss on
    them), lattices and stencils of several axes."""
    r = g.r
    names = r.sample(sorted(PRODUCT_DOMAINS), r.choice((2, 3, 3)))
    for n in names:
        g.d.lines.append(f"domain {n} = {PRODUCT_DOMAINS[n][0]}")
    outs = [n for n in names if n != "K"][:r.choice((1, 2))] or ["G"]
    if "G" in outs and "G" not in names:
        g.d.lines.append("domain G = grid(0, 1)")
    ins = r.sample(names, r.choice((1, 2)) if len(names) > 1 else 1)
    ov = {n: f"{n.lower()}" for n in outs}
    iv = {n: f"{n.lower()}2" for n in ins}
    scope = [(ov[n], n) for n in outs] + [(iv[n], n) for n in ins]
    # a field on a product of some of the variables' domains, read at those variables
    picked = r.sample(scope, r.choice((1, 2)) if len(scope) > 1 else 1)
    c = r.choice((None, None, 2))
    g.d.lines.append(f"input  f : {' * '.join(d for _, d in picked)} -> {_type(c)}")
    read = f"f({', '.join(v for v, _ in picked)})"
    terms = [PRODUCT_DOMAINS[d][1][r.randrange(len(PRODUCT_DOMAINS[d][1]))].format(v=v)
             for v, d in scope]
    g.real("a", None, g.pick(" = 0.5", " = -0.3", " = 1.2"))
    mix = " + ".join(terms)
    k = g.pick(f"exp(-a * ({mix})^2)", f"sin(a * ({mix}))", f"1 / (1 + ({mix})^2)",
               f"sigmoid({mix}) * a")
    read_vars = {v for v, _ in picked}
    rules = []
    for n in ins:
        kind = PRODUCT_DOMAINS[n][0].split("(")[0]
        options = [q for q in rules_on(kind) if not q.sampled and not q.from_input
                   and not (q.own_nodes and iv[n] in read_vars)]
        q = r.choice(options)
        rules.append(f"{q.name}({r.randint(2, 4)})" if q.args else q.name)
    quad = "" if r.random() < 0.3 else (
        f" with {rules[0]}" if len(rules) == 1 else f" with ({', '.join(rules)})")
    binders = ", ".join(f"{iv[n]}: {n}" for n in ins)
    out = f"integral({binders}) ({k}) * {read}{quad}"
    if r.random() < 0.2:
        out = f"{terms[0]} + {out}"
    return g.text("product", f"output o({', '.join(f'{ov[n]}: {n}' for n in outs)}) = {out}")


FAMILIES = {general: 10, attention: 2, recurrence: 2, causal_lowrank: 1, convolution: 2,
            lowrank: 2, matmul: 2, lattice: 3, product: 3}


def generate(seed: int) -> Generated:
    """The program of `seed` (always the same text for the same seed)."""
    r = random.Random(seed)
    family = r.choices(list(FAMILIES), weights=list(FAMILIES.values()))[0]
    # one operator name per seed: compiled operators are registered by name and content
    name = f"{family.__name__}_{seed}"
    text = family(_Gen(r)).replace(f"operator {family.__name__} ", f"operator {name} ", 1)
    return Generated(seed, family.__name__, name, text)


def _type(width: int | None) -> str:
    return "R" if width is None else f"R^{width}"


def _atom(e: str) -> str:
    """`e` parenthesised unless it already is one operand."""
    depth = 0
    for i, ch in enumerate(e):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and ch in " +-*/^" and i > 0:
            return f"({e})"
    return e
