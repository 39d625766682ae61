"""Fuzzing the front end (and the reference runtime) with hypothesis.

The property: `load_source(text)` either succeeds or raises an `ItdslError`; nothing else
(a lark exception, RecursionError, KeyError, ...) may escape. Programs that check are
also built with the reference target and called on tiny random inputs, which must give a
tensor of the right shape or an `ItdslError`. Every program that parses must survive the
round trip through the printer: `parse(print_program(ast)) == ast`.

Two sources of programs: mutations of the examples (characters, tokens and lines deleted,
inserted, replaced, duplicated and swapped) and programs generated from the language's
vocabulary, mostly well-typed (so that they reach the runtime) and sometimes sloppy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import itdsl
from itdsl.errors import ItdslError
from itdsl.frontend import check, ir, parse
from itdsl.frontend.ast import DomainKind, ParamKind
from itdsl.frontend.printer import print_program

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = {p.name: p.read_text() for p in sorted((REPO / "examples").glob("*.it"))}


def fuzz(n: int) -> settings:
    """Settings for a fuzz test of `n` examples (no deadline: the first call imports torch)."""
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


# ---- the property --------------------------------------------------------------------------


def _param_elements(op) -> int:
    """How many numbers the params of an operator hold (to skip absurdly large ones)."""
    total = 0
    for p in op.params:
        if p.kind is ParamKind.MLP:
            total += sum(a * b for a, b in zip(p.sizes, p.sizes[1:]))
        elif p.kind is ParamKind.SPLINE:
            n = 1
            for s in p.sizes:
                n *= s
            total += n
        else:
            total += p.width or 1
    return total


def _inputs(op, gen: torch.Generator) -> tuple[dict, dict[str, int]]:
    """Keyword arguments for a call of `op` on tiny random inputs, and the sizes of each
    domain's axes."""
    sizes = {d.name: d.fixed or tuple(int(torch.randint(2, 6, (), generator=gen))
                                      for _ in d.axes) for d in op.domains}
    on = {name for i in op.inputs for name in i.domains}
    kwargs: dict = {}
    for d in op.domains:
        n = sizes[d.name]
        if d.kind is DomainKind.POINTS:
            kwargs[d.name] = torch.rand(n[0], d.dim, generator=gen)
        elif d.name not in on and d.fixed is None:
            kwargs[d.name] = n[0] if len(n) == 1 else n
    for i in op.inputs:
        axes = tuple(k for name in i.domains for k in sizes[name])
        shape = axes if i.width is None else (*axes, i.width)
        kwargs[i.name] = torch.randn(*shape, generator=gen)
    return kwargs, sizes


def run_reference(text: str, seed: int = 0) -> None:
    """Build every operator of a checked program and call it once."""
    try:
        prog = itdsl.compile_source(text, target="reference")
    except ItdslError:
        return
    gen = torch.Generator().manual_seed(seed)
    for name in prog.names:
        op_ir = prog.ir[name]
        if _param_elements(op_ir) > 2_000_000 or any((i.width or 1) > 4096 for i in op_ir.inputs):
            continue  # valid, but too big to build in a fuzz test
        try:
            op = prog[name]
            kwargs, sizes = _inputs(op_ir, gen)
            out = op(generator=gen, **kwargs)
        except ItdslError:
            continue
        assert isinstance(out, torch.Tensor), type(out)
        axes = tuple(k for d in op_ir.output.domains for k in sizes[d])
        width = op_ir.output.width
        want = axes if width is None else (*axes, width)
        assert tuple(out.shape) == want, (name, tuple(out.shape), want, text)


def check_text(text: str, *, run: bool = True) -> None:
    """The fuzz property for one program text."""
    try:
        tree = parse(text)
    except ItdslError:
        return
    printed = print_program(tree)
    assert parse(printed) == tree, f"round trip changed the program:\n{text}\n---\n{printed}"
    try:
        check(tree)
    except ItdslError:
        return
    if run:
        run_reference(text)


# ---- (a) mutations of the examples ----------------------------------------------------------

KEYWORDS = ["operator", "domain", "input", "param", "kernel", "output", "integral", "with",
            "and", "or"]
PUNCT = ["{", "}", "(", ")", "[", "]", ",", ":", "=", "->", "+", "-", "*", "/", "^", "<", "<=",
         ">", ">=", "==", "!=", "**", "&&", "||", "@", "!", ";", "'", "."]
WORDS = ["points", "grid", "index", "R", "mlp", "spline", "act", "gelu", "relu", "normal",
         "uniform", "exp", "log", "sqrt", "abs", "sin", "cos", "tanh", "sigmoid", "softplus",
         "min", "max", "dot", "norm", "sqnorm", "sum", "mean", "weights", "riemann", "trapezoid",
         "simpson", "gauss", "montecarlo", "importance", "pi", "x", "y", "t", "s", "X", "Y", "T",
         "f", "k", "g", "sqnrm", "pionts"]
NUMBERS = ["0", "1", "2", "3", "0.5", "64", "1e999", "1e-3", ".5", "2.5", "100", "65537",
           "99999999999999999999"]
VOCAB = KEYWORDS + PUNCT + WORDS + NUMBERS
ODD_CHARS = list("{}()[],:=+-*/^<>!@&|;'\"#.\t\n ") + ["\x00", "é", "\u00a0", "\u2212", "0", "x"]

TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z_0-9]*|\d+\.?\d*(?:[eE][+-]?\d+)?|<=|>=|==|!=|->|\S")


def _tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


@st.composite
def mutation(draw, text: str) -> str:
    kind = draw(st.sampled_from(["char_del", "char_ins", "char_rep", "char_dup", "tok_del",
                                 "tok_dup", "tok_rep", "tok_ins", "tok_swap", "line_del",
                                 "line_dup", "line_swap"]))
    if kind.startswith("char"):
        i = draw(st.integers(0, max(0, len(text) - 1)))
        c = draw(st.sampled_from(ODD_CHARS))
        if kind == "char_del":
            return text[:i] + text[i + 1:]
        if kind == "char_ins":
            return text[:i] + c + text[i:]
        if kind == "char_dup":
            return text[:i + 1] + text[i:]
        return text[:i] + c + text[i + 1:]
    if kind.startswith("tok"):
        toks = _tokens(text)
        solid = [i for i, t in enumerate(toks) if not t.isspace()]
        if not solid:
            return text
        i = draw(st.sampled_from(solid))
        if kind == "tok_del":
            del toks[i]
        elif kind == "tok_dup":
            toks.insert(i, toks[i] + " ")
        elif kind == "tok_rep":
            toks[i] = draw(st.sampled_from(VOCAB))
        elif kind == "tok_ins":
            toks.insert(i, " " + draw(st.sampled_from(VOCAB)) + " ")
        else:
            j = draw(st.sampled_from(solid))
            toks[i], toks[j] = toks[j], toks[i]
        return "".join(toks)
    lines = text.split("\n")
    i = draw(st.integers(0, len(lines) - 1))
    if kind == "line_del":
        del lines[i]
    elif kind == "line_dup":
        lines.insert(i, lines[i])
    else:
        j = draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


@st.composite
def mutated_example(draw) -> str:
    text = EXAMPLES[draw(st.sampled_from(sorted(EXAMPLES)))]
    for _ in range(draw(st.integers(1, 4))):
        text = draw(mutation(text))
    return text


@fuzz(600)
@given(mutated_example())
def test_mutated_examples(text):
    check_text(text)


@fuzz(150)
@given(st.lists(st.sampled_from(VOCAB), max_size=40))
def test_token_soup(toks):
    """Random token sequences, wrapped in an operator block half the time."""
    body = " ".join(toks)
    check_text(body, run=False)
    check_text("operator a {\n" + body + "\n}\n", run=False)


# ---- (b) generated programs -------------------------------------------------------------------

from fuzzing.generate import UNARY  # noqa: E402  (the function table's unary calls)

BINOPS = ["+", "-", "*", "/"]
CMPS = ["<", "<=", ">", ">=", "==", "!="]
QUADS = {DomainKind.POINTS: ["sum", "mean", "weights", "montecarlo(3)",
                             "montecarlo(4, importance = 1)"],
         DomainKind.INDEX: ["sum", "mean", "weights", "montecarlo(2)"],
         DomainKind.GRID: ["sum", "mean", "weights", "riemann", "trapezoid", "simpson",
                           "gauss(3)"]}
ALL_QUADS = sorted({q for qs in QUADS.values() for q in qs} | {"simson", "gauss(0)"})


@dataclass
class Env:
    """What a generated operator has declared so far."""

    sloppy: bool  # ignore widths and domains now and then (to make invalid programs)
    domains: dict[str, tuple[DomainKind, int | None]] = field(default_factory=dict)
    inputs: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    params: dict[str, tuple[ParamKind, tuple]] = field(default_factory=dict)
    kernels: dict[str, tuple[str, str, int | None]] = field(default_factory=dict)


def _num(draw) -> str:
    return draw(st.sampled_from(["0", "1", "2", "0.5", "3", "1.5", "pi", "1e-3", "(2)", "-1"]))


@st.composite
def expr(draw, env: Env, vars: dict[str, str], width: int | None, depth: int) -> str:
    """An expression of the given width (None: scalar) over the point variables `vars`."""
    if env.sloppy and draw(st.integers(0, 9)) == 0:
        width = draw(st.sampled_from([None, 1, 2, 3]))
    leaves: list[str] = []
    for v, dom in vars.items():
        kind, dim = env.domains[dom]
        if kind is DomainKind.POINTS:
            if dim == width:
                leaves.append(v)
            if width is None:
                leaves += [f"norm({v})", f"{v}[{dim - 1}]", f"sum({v})"]
        elif width is None:
            leaves.append(v)
    for name, (dom, w) in env.inputs.items():
        for v, vdom in vars.items():
            if (vdom == dom and w == width) or (env.sloppy and draw(st.integers(0, 19)) == 0):
                leaves.append(f"{name}({v})")
    for name, (kind, spec) in env.params.items():
        if kind is ParamKind.REAL and spec[0] == width:
            leaves.append(name)
    if width is None:
        leaves.append(_num(draw))
    if depth <= 0 or not leaves or draw(st.integers(0, 3)) == 0:
        if not leaves:
            if width is None:
                return _num(draw)
            return f"({_num(draw)} * {_vector(draw, env, vars, width)})"
        return draw(st.sampled_from(leaves))
    sub = depth - 1
    choice = draw(st.sampled_from(["unary", "binary", "binary", "neg", "pow", "minmax", "reduce",
                                   "component", "bracket", "mlp", "spline", "kernel", "paren"]))
    if choice == "unary":
        return f"{draw(st.sampled_from(UNARY))}({draw(expr(env, vars, width, sub))})"
    if choice == "binary":
        a = draw(expr(env, vars, width, sub))
        b = draw(expr(env, vars, draw(st.sampled_from([width, None])), sub))
        if draw(st.booleans()):
            a, b = b, a
        return f"({a} {draw(st.sampled_from(BINOPS))} {b})"
    if choice == "neg":
        return f"-{draw(expr(env, vars, width, sub))}"
    if choice == "pow":
        e = draw(st.sampled_from(["2", "3", "0.5", "-1", "(1 + 1)", "-2^2"]))
        return f"({draw(expr(env, vars, width, sub))})^{e}"
    if choice == "minmax":
        f = draw(st.sampled_from(["min", "max"]))
        return f"{f}({draw(expr(env, vars, width, sub))}, {draw(expr(env, vars, None, sub))})"
    if choice == "reduce" and width is None:
        w = draw(st.sampled_from([1, 2, 3]))
        f = draw(st.sampled_from(["dot", "norm", "sqnorm", "sum"]))
        a = draw(expr(env, vars, w, sub))
        if f == "dot":
            return f"dot({a}, {draw(expr(env, vars, w, sub))})"
        return f"{f}({a})"
    if choice == "component" and width is None:
        w = draw(st.sampled_from([1, 2, 3]))
        return f"({draw(expr(env, vars, w, sub))})[{draw(st.integers(0, w - 1))}]"
    if choice == "bracket":
        a, op, b = (draw(expr(env, vars, None, sub)), draw(st.sampled_from(CMPS)),
                    draw(expr(env, vars, None, sub)))
        parts = [f"{a} {op} {b}"]
        while draw(st.integers(0, 2)) == 0:
            parts.append(draw(st.sampled_from(["and", "or"])))
            parts.append(f"({draw(expr(env, vars, None, 0))} < {draw(expr(env, vars, None, 0))})")
        cond = " ".join(parts)
        return f"[{cond}]" if width is None else f"[{cond}] * {draw(expr(env, vars, width, 0))}"
    if choice == "mlp":
        mlps = [(n, s) for n, (k, s) in env.params.items() if k is ParamKind.MLP
                and ((s[-1] if s[-1] != 1 else None) == width or env.sloppy)]
        if mlps:
            name, sizes = draw(st.sampled_from(mlps))
            args, total = [], 0
            while total < sizes[0]:
                w = draw(st.sampled_from([None, 1, 2]))
                w = None if w is not None and total + w > sizes[0] else w
                args.append(draw(expr(env, vars, w, 0)))
                total += w or 1
            return f"{name}({', '.join(args)})"
    if choice == "spline" and width is None:
        splines = [(n, s) for n, (k, s) in env.params.items() if k is ParamKind.SPLINE]
        if splines:
            name, sizes = draw(st.sampled_from(splines))
            args = [draw(expr(env, vars, None, 0)) for _ in sizes]
            return f"{name}({', '.join(args)})"
    if choice == "kernel":
        ks = [(n, k) for n, k in env.kernels.items() if k[2] == width or env.sloppy]
        if ks:
            name, (xd, yd, _) = draw(st.sampled_from(ks))
            xs = [v for v, d in vars.items() if d == xd or env.sloppy]
            ys = [v for v, d in vars.items() if d == yd or env.sloppy]
            if xs and ys:
                return f"{name}({draw(st.sampled_from(xs))}, {draw(st.sampled_from(ys))})"
    if choice == "paren":
        return f"({draw(expr(env, vars, width, sub))})"
    return draw(st.sampled_from(leaves))


def _vector(draw, env, vars, width) -> str:
    """A vector of the given width when nothing declared has it: a param's worth of ones."""
    for name, (kind, spec) in env.params.items():
        if kind is ParamKind.REAL and spec[0] == width:
            return name
    return "1"  # a scalar: only right in a sloppy program


@st.composite
def integral(draw, env: Env, x: str, xdom: str, width: int | None) -> str:
    ydom = draw(st.sampled_from(sorted(env.domains)))
    kind = env.domains[ydom][0]
    y = "y"
    vars = {x: xdom, y: ydom}
    factors = [draw(expr(env, vars, w, 2)) for w in
               ([width] + [None] * draw(st.integers(0, 1)))]
    if draw(st.booleans()):
        factors = [f"({f})" for f in factors]
    quad = draw(st.sampled_from(QUADS[kind] + ["", ""] +
                                (ALL_QUADS if env.sloppy else [])))
    if quad == "weights":
        ws = [n for n, (d, w) in env.inputs.items() if d == ydom and w is None]
        quad = f"weights({ws[0]})" if ws else ""
    if "importance" in quad:
        quad = f"montecarlo(3, importance = {draw(expr(env, {y: ydom}, None, 1))} ^ 2 + 0.1)"
    body = " * ".join(factors)
    if quad and draw(st.booleans()):
        return f"integral({y}: {ydom}) {body} with {quad}"
    if draw(st.integers(0, 3)) == 0:  # a normalised integral (attention-like)
        den = draw(expr(env, vars, None, 1))
        tail = f" with {quad}" if quad else ""
        return (f"integral({y}: {ydom}) exp({den}) * {body}{tail} / "
                f"integral({y}: {ydom}) exp({den}){tail}")
    open_ = f"integral({y}: {ydom}) {body}" + (f" with {quad}" if quad else "")
    # An open integral ends its term: it may follow `-`, `*` or `/`, and be followed by `/`.
    return draw(st.sampled_from([f"({open_})", open_, f"-{open_}", f"2 * {open_}",
                                 f"{open_} / 2", f"1 / -{open_}", f"-({open_}) * 0.5"]))


@st.composite
def program(draw) -> str:
    env = Env(sloppy=draw(st.integers(0, 3)) == 0)
    lines = []
    for name in draw(st.lists(st.sampled_from(["X", "Y", "T"]), min_size=1, max_size=3,
                              unique=True)):
        # the version 0 kinds (lattices, stencils and products: tests/fuzzing/generate.py's
        # `lattice` and `product` families, and the mutations of the examples)
        kind = draw(st.sampled_from([DomainKind.POINTS, DomainKind.GRID, DomainKind.INDEX]))
        if kind is DomainKind.POINTS:
            dim = draw(st.integers(1, 3))
            lines.append(f"domain {name} = points({dim})")
        elif kind is DomainKind.GRID:
            dim = None
            lines.append(f"domain {name} = grid({draw(st.sampled_from(['0', '-1', '0.5']))}, "
                         f"{draw(st.sampled_from(['1', '2', 'pi']))})")
        else:
            dim = None
            lines.append(f"domain {name} = index")
        env.domains[name] = (kind, dim)
    doms = sorted(env.domains)
    for name in draw(st.lists(st.sampled_from(["f", "b", "v", "w"]), max_size=4, unique=True)):
        dom = draw(st.sampled_from(doms))
        width = draw(st.sampled_from([None, None, 1, 2, 3]))
        lines.append(f"input {name} : {dom} -> {'R' if width is None else f'R^{width}'}")
        env.inputs[name] = (dom, width)
    for name in draw(st.lists(st.sampled_from(["a", "c", "phi", "W"]), max_size=3, unique=True)):
        kind = draw(st.sampled_from(list(ParamKind)))
        if kind is ParamKind.REAL:
            width = draw(st.sampled_from([None, 1, 2, 3]))
            init = draw(st.sampled_from(["", " = 0.5", " = normal(0.1)", " = uniform(-1, 1)"]))
            lines.append(f"param {name} : {'R' if width is None else f'R^{width}'}{init}")
            env.params[name] = (kind, (width,))
        elif kind is ParamKind.MLP:
            sizes = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=3)))
            act = draw(st.sampled_from(["gelu", "relu", "tanh", "identity"]))
            init = draw(st.sampled_from(["", " = normal(0.02)"]))
            lines.append(f"param {name} : mlp({' -> '.join(map(str, sizes))}, act = {act})"
                         f"{init}")
            env.params[name] = (kind, sizes)
        else:
            sizes = tuple(draw(st.lists(st.integers(2, 5), min_size=1, max_size=2)))
            lines.append(f"param {name} : spline({', '.join(map(str, sizes))})")
            env.params[name] = (kind, sizes)
    for name in draw(st.lists(st.sampled_from(["k", "h"]), max_size=2, unique=True)):
        xd, yd = draw(st.sampled_from(doms)), draw(st.sampled_from(doms))
        width = draw(st.sampled_from([None, None, 1, 2]))
        body = draw(expr(env, {"p": xd, "q": yd}, width, 3))
        lines.append(f"kernel {name}(p: {xd}, q: {yd}) = {body}")
        env.kernels[name] = (xd, yd, width)
    xdom = draw(st.sampled_from(doms))
    width = draw(st.sampled_from([None, 1, 2]))
    terms = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            terms.append(draw(integral(env, "x", xdom, width)))
        else:
            terms.append(draw(expr(env, {"x": xdom}, width, 2)))
    lines.append(f"output g(x: {xdom}) = " + " + ".join(terms))
    if env.sloppy and len(lines) > 1 and draw(st.booleans()):  # break declare-before-use
        i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    return "operator gen {\n" + "".join(f"    {ln}\n" for ln in lines) + "}\n"


@fuzz(500)
@given(program())
def test_generated_programs(text):
    check_text(text)


def test_generated_programs_often_check():
    """The generator is useful only if many of its programs are valid (and so reach the
    runtime): draw a fixed sample and count."""
    ok = 0
    samples = []

    @fuzz(60)
    @given(program())
    def collect(text):
        samples.append(text)

    collect()
    for text in samples:
        try:
            check(parse(text))
            ok += 1
        except ItdslError:
            pass
    assert ok >= len(samples) // 4, f"only {ok} of {len(samples)} generated programs check"


# ---- examples: the reference runs on every operator --------------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_run(name):
    check_text(EXAMPLES[name])


def test_example_mutants_of_every_line():
    """Deterministically: every example with each line deleted, and each line duplicated."""
    for text in EXAMPLES.values():
        lines = text.split("\n")
        for i in range(len(lines)):
            check_text("\n".join(lines[:i] + lines[i + 1:]), run=False)
            check_text("\n".join(lines[:i + 1] + lines[i:]), run=False)


# ---- regressions found by the fuzzer in the reference runtime -------------------------------


def _run_c(line: str, **kwargs) -> torch.Tensor:
    text = ("operator c {\n    domain X = index\n    domain Y = index\n    input w : Y -> R\n"
            "    input h : X -> R\n    " + line + "\n}\n")
    return itdsl.compile_source(text, target="reference")["c"](**kwargs)


@pytest.mark.parametrize("line, want", [
    ("output g(x: X) = 2", 2.0),  # used to raise IndexError (a 1-D constant)
    ("output g(x: X) = integral(y: Y) exp(1) * 2 / integral(y: Y) exp(1)", 2.0),
    ("output g(x: X) = integral(y: Y) 2 * w(y)", 8.0),
    ("output g(x: X) = integral(y: Y) 2 with weights(w)", 8.0),
])
def test_constant_values(line, want):
    out = _run_c(line, h=torch.ones(3), w=torch.ones(4))
    assert out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), want))


@pytest.mark.parametrize("line, want", [
    ("output g(x: X) = integral(y: Y) 2", 8.0),  # sum over 4 points of 2
    ("output g(x: X) = integral(y: Y) 2 with mean", 2.0),
    ("output g(x: X) = integral(y: Y) h(x) with sum", 4.0),
])
def test_integrand_free_of_the_integration_variable(line, want):
    out = _run_c(line, h=torch.ones(3), w=torch.ones(4))
    assert torch.allclose(out, torch.full((3,), want)), out


@pytest.mark.parametrize("kind", ["input", "domain"])
def test_names_taken_by_the_call_are_rejected(kind):
    """An input or domain named `self` used to collide with nn.Module.__call__'s `self`."""
    if kind == "input":
        text = ("operator c {\n    domain X = index\n    input self : X -> R\n"
                "    output g(x: X) = self(x)\n}\n")
    else:
        text = "operator c {\n    domain self = index\n    output g(x: self) = x\n}\n"
    with pytest.raises(ItdslError, match="`self` cannot name a domain or an input"):
        itdsl.compile_source(text)


def test_deepest_accepted_program_runs():
    """A program just inside the checker's depth limit (kernels inlined) must run through the
    reference, `explain` and the strategy analysis without exhausting Python's stack."""
    from itdsl.frontend.check import MAX_IR_DEPTH

    def nest(inner: str, n: int) -> str:
        return "exp(" * n + inner + ")" * n

    per = 40
    kernels = (MAX_IR_DEPTH - 10) // per
    chain = "".join(f"    kernel k{i + 1}(x: X, y: X) = {nest(f'k{i}(x, y)', per)}\n"
                    for i in range(kernels))
    spare = MAX_IR_DEPTH - 10 - kernels * per
    text = ("operator a {\n    domain X = index\n    input f : X -> R\n"
            f"    kernel k0(x: X, y: X) = {nest('f(y) * 1e-9', spare)}\n{chain}"
            f"    output u(x: X) = integral(y: X) k{kernels}(x, y) * f(y) / "
            f"integral(y: X) k{kernels}(x, y)\n}}\n")
    prog = itdsl.compile_source(text, target="reference")
    depth, stack = 0, [(prog.ir["a"].output.body, 1)]
    while stack:
        node, d = stack.pop()
        depth = max(depth, d)
        stack.extend((c, d + 1) for c in ir.children(node))
    assert MAX_IR_DEPTH - 10 <= depth <= MAX_IR_DEPTH
    op = prog["a"]
    assert op(f=torch.rand(4)).shape == (4,)
    assert prog.explain("a")
    assert op.strategy
