"""Malformed programs: the right error class, a clear message, the right place, a useful hint.

Each row of `CASES` is one malformed `.it` program with the error it must raise: its class
(`ParseError` for text that is not a program, `CheckError` for a program that breaks a
rule), a piece of its message, the exact `line:col` it points at and, where there is one, a
piece of its hint. Most programs are a common prelude (lines 1-7) plus the line under test
(line 8), so that positions are easy to read off.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from itdsl.errors import CheckError, ItdslError, ItdslErrors, ParseError
from itdsl.frontend import load_source, parse, parse_file
from itdsl.frontend.parser import MAX_DEPTH, MAX_SOURCE_BYTES

REPO = Path(__file__).resolve().parents[1]

# Lines 1-7 of most programs below; the line under test is line 8.
PRELUDE = """operator a {
    domain X = points(3)
    domain Y = points(3)
    domain T = grid(0, 1)
    domain I = index
    input f : Y -> R^4
    input w : Y -> R
"""


def body(*lines: str) -> str:
    """The prelude, then `lines` (from line 8 on), then the closing brace."""
    return PRELUDE + "".join(f"    {ln}\n" for ln in lines) + "}\n"


def out(expr: str) -> str:
    """An operator whose output (line 8, the expression starting at column 22) is `expr`."""
    return body(f"output u(x: X) = {expr}")


# Lines 1-7 of the version 1 programs below (lattices, stencils, products); line 8 under test.
LATTICE = """operator a {
    domain P = index(2)
    domain T = stencil(3, 3)
    domain U = grid(0, 1)
    domain V = grid(0, 1)
    input f : V * P -> R
    input h : P -> R^2
"""


def lattice(*lines: str) -> str:
    return LATTICE + "".join(f"    {ln}\n" for ln in lines) + "}\n"


def lat_out(expr: str) -> str:
    """A version 1 operator whose output (line 8, the expression from column 32) is `expr`."""
    return lattice(f"output g(u: U, p: P) = {expr}")


@dataclass(frozen=True)
class Case:
    id: str
    source: str
    cls: type[ItdslError]
    message: str
    where: str  # "line:col"
    hint: str | None = None


CASES = [
    # ---- parse errors: the text is not a program ---------------------------------------
    Case("eof-missing-brace", "operator a {\n    domain X = index\n", ParseError,
         "unexpected end of file", "2:21", "missing its closing `}`"),
    Case("missing-open-brace", "operator a\n    domain X = index\n}\n", ParseError,
         "unexpected `domain`; expected `{`", "2:5"),
    Case("double-star", out("f(x) ** 2"), ParseError, "`**` is not an operator", "8:27",
         "write powers with `^`"),
    Case("assign-not-compare", out("[x[0] = 1]"), ParseError, "unexpected `=`", "8:28",
         "compare with `==`"),
    Case("juxtaposition", out("2 norm(x)"), ParseError, "unexpected `norm`", "8:24",
         "write multiplication explicitly with `*`"),
    Case("juxtaposition-paren", out("norm(x) (1 + x[0])"), ParseError, "unexpected `(`", "8:30",
         "write multiplication explicitly with `*`"),
    Case("reserved-input-name", body("input with : X -> R"), ParseError,
         "`with` is a reserved word and cannot be used as a name", "8:11", "choose another"),
    Case("reserved-operator-name", "operator operator {\n}\n", ParseError,
         "`operator` is a reserved word", "1:10"),
    Case("reserved-binder", body("output u(and: X) = 1"), ParseError,
         "`and` is a reserved word", "8:14"),
    Case("reserved-in-expression", out("integral + 1"), ParseError, "unexpected `+`", "8:31"),
    Case("eof-in-expression", PRELUDE + "    output u(x: X) = norm(x) +", ParseError,
         "unexpected end of file; expected an expression", "8:31"),
    Case("unclosed-call", body("output u(x: X) = norm(x", ""), ParseError,
         "unexpected `}`; expected `)`", "10:1"),
    Case("at-sign", out("x @ x"), ParseError, "unexpected character `@`", "8:24"),
    Case("and-and", out("[x[0] < 1 && x[1] > 0]"), ParseError, "unexpected character `&`",
         "8:32", "write `and`"),
    Case("or-or", out("[x[0] < 1 || x[1] > 0]"), ParseError, "unexpected character `|`",
         "8:32", "write `or`"),
    Case("not", out("[!(x[0] < 1)]"), ParseError, "unexpected character `!`", "8:23",
         "there is no `not`"),
    Case("semicolon", body("output u(x: X) = 1;"), ParseError, "unexpected character `;`",
         "8:23", "no separator"),
    Case("string", out('"x"'), ParseError, "unexpected character `\"`", "8:22", "no strings"),
    Case("unicode-minus", out("1 \u2212 x[0]"), ParseError, "unexpected character", "8:24",
         "Unicode minus"),
    Case("nul-byte", "operator a {\n  \x00\n}\n", ParseError, "NUL byte", "2:3"),
    Case("with-without-integral", out("f(x) with sum"), ParseError, "unexpected `with`", "8:27",
         "`with` follows an integral"),
    Case("quadrature-without-with", out("integral(y: Y) f(y) mean"), ParseError,
         "unexpected `mean`", "8:42", "follows `with`"),
    Case("misspelled-declaration", body("outptu u(x: X) = 1"), ParseError,
         "unexpected `outptu`", "8:5", "did you mean `output`?"),
    Case("declaration-outside-operator", "domain X = index\n", ParseError,
         "unexpected `domain`; expected `operator`", "1:1", "inside an `operator"),
    Case("stray-closing-brace", body("output u(x: X) = 1") + "}\n", ParseError,
         "unexpected `}`", "10:1", "closes no `operator` block"),
    Case("incomplete-expression-then-declaration", body("output u(x: X) =", "param p : R"),
         ParseError, "unexpected `param`; expected an expression", "9:5",
         "the expression before it is incomplete"),
    Case("operator-missing-brace-before-next", "operator a {\n    domain X = index\n"
         "operator b {\n}\n", ParseError, "unexpected `operator`", "3:1",
         "missing its closing `}`"),
    # ---- builder errors: well-formed text, but a declaration is wrong ----------------------
    Case("unknown-domain-kind", body("domain Z = pionts(3)"), ParseError,
         "unknown domain kind `pionts`", "8:16", "did you mean `points`?"),
    Case("unknown-domain-kind-no-hint", body("domain Z = cloud"), ParseError,
         "unknown domain kind `cloud`", "8:16",
         "`points(D)`, `grid(a, b)`, `index(D)` or `stencil(k1, k2)`"),
    Case("fractional-width", body("input g : X -> R^2.5"), ParseError,
         "a vector width must be an integer", "8:22"),
    Case("zero-width", body("param p : R^0"), ParseError, "a vector width must be an integer",
         "8:17"),
    Case("huge-width", body("input g : X -> R^1e999"), ParseError,
         "a vector width must be an integer in [1, 65536], got inf", "8:22"),
    Case("unknown-value-type", body("input g : X -> C^2"), ParseError,
         "unknown value type `C`", "8:20", "`R` or `R^C`"),
    Case("grid-reversed", body("domain Z = grid(1, 0)"), ParseError,
         "a grid needs a < b, got grid(1, 0)", "8:21", "write `grid(0, 1)`"),
    Case("grid-one-argument", body("domain Z = grid(0)"), ParseError,
         "`grid` takes 2 arguments, got 1", "8:16", "write `grid(a, b)`"),
    Case("points-zero", body("domain Z = points(0)"), ParseError,
         "the dimension of `points` must be an integer in [1, 64], got 0", "8:23"),
    Case("index-four-axes", body("domain Z = index(4)"), ParseError,
         "the dimension of `index` must be 1, 2 or 3, got 4", "8:22"),
    Case("index-two-arguments", body("domain Z = index(2, 2)"), ParseError,
         "`index` takes 0 or 1 arguments, got 2", "8:16", "write `index(D)`"),
    Case("domain-not-constant", body("domain Z = grid(0, x)"), ParseError,
         "expected a constant number here", "8:24", "only numbers, `pi`"),
    Case("mlp-without-arrows", body("param phi : mlp(3, act = gelu)"), ParseError,
         "an mlp needs its layer widths as `I -> H -> ... -> O`", "8:17"),
    Case("mlp-unknown-activation", body("param phi : mlp(3 -> 4, act = gelo)"), ParseError,
         "unknown activation `gelo`", "8:35", "did you mean `gelu`?"),
    Case("mlp-unknown-option", body("param phi : mlp(3 -> 4, bias = relu)"), ParseError,
         "unknown mlp option `bias`", "8:29", "the option is `act`"),
    Case("mlp-zero-width", body("param phi : mlp(3 -> 0)"), ParseError,
         "a layer width must be an integer in [1, 16384], got 0", "8:26"),
    Case("mlp-constant-init", body("param phi : mlp(3 -> 4) = 0.5"), ParseError,
         "an `mlp` param takes a random initialiser, not a constant", "8:31", "normal(0.02)"),
    Case("spline-three-sizes", body("param W : spline(4, 4, 4)"), ParseError,
         "a spline is `spline(n)`, `spline(n1, n2)` or `spline(n1, n2, per = T)`", "8:15"),
    Case("spline-one-node", body("param W : spline(1)"), ParseError,
         "a spline size must be an integer in [2, 4096], got 1", "8:22"),
    Case("unknown-param-type", body("param W : splin(4)"), ParseError,
         "unknown param type `splin`", "8:15", "did you mean `spline`?"),
    Case("unknown-initialiser", body("param p : R = norml(0.1)"), ParseError,
         "unknown initialiser `norml`", "8:19", "did you mean `normal`?"),
    Case("normal-negative-std", body("param p : R = normal(-1)"), ParseError,
         "the standard deviation of `normal` must be >= 0", "8:26"),
    Case("uniform-arity", body("param p : R = uniform(1)"), ParseError,
         "`uniform` takes 2 arguments, got 1", "8:19", "uniform(a, b)"),
    Case("uniform-reversed", body("param p : R = uniform(1, 0)"), ParseError,
         "`uniform(a, b)` needs a <= b", "8:19", "uniform(0, 1)"),
    Case("uniform-too-wide", body("param p : R = uniform(-3e38, 3e38)"), ParseError,
         "the range of `uniform` is wider", "8:19"),
    Case("init-beyond-float32", body("param p : R = -1e39"), ParseError,
         "the initial value -1e+39 is beyond the largest float32", "8:19", "float64"),
    Case("normal-beyond-float32", body("param p : R = normal(1e39)"), ParseError,
         "the standard deviation 1e+39 of `normal` is beyond the largest float32", "8:26"),
    Case("init-not-constant", body("param p : R = x"), ParseError,
         "expected a constant number here", "8:19"),
    Case("number-out-of-range", out("1e999 * x[0]"), ParseError, "number `1e999` is out of range",
         "8:22"),
    Case("component-index-huge", out("x[1e999]"), ParseError,
         "a component index must be an integer", "8:24"),
    Case("component-index-huge-integer", out("x[99999999999999999999]"), ParseError,
         "a component index must be an integer in [0, 65536], got 100000000000000000000",
         "8:24"),
    Case("huge-integer-width", body("input g : X -> R^99999999999999999999"), ParseError,
         "a vector width must be an integer in [1, 65536], got 100000000000000000000", "8:22"),
    Case("spline-zero-nodes", body("param W : spline(0)"), ParseError,
         "a spline size must be an integer in [2, 4096], got 0", "8:22"),
    Case("mlp-zero-input-width", body("param phi : mlp(0 -> 3)"), ParseError,
         "a layer width must be an integer in [1, 16384], got 0", "8:21"),
    Case("points-out-of-range", body("domain Z = points(1e999)"), ParseError,
         "number `1e999` is out of range", "8:23"),
    Case("init-out-of-range", body("param p : R = 1e999"), ParseError,
         "number `1e999` is out of range", "8:19"),
    Case("init-overflows", body("param p : R = 1e308 * 10"), ParseError,
         "expected a constant number here", "8:19"),
    Case("mlp-activation-twice", body("param phi : mlp(3 -> 4, act = relu, act = tanh)"),
         ParseError, "the option `act` is given twice", "8:41", "one activation"),
    # ---- checker errors: a program that breaks a rule of the language -------------------------
    Case("unknown-function", body("kernel k(x: X, y: Y) = exp(-sqnrm(x - y))",
                                  "output u(x: X) = integral(y: Y) k(x, y) * f(y)"),
         CheckError, "unknown function `sqnrm`", "8:33", "did you mean `sqnorm`?"),
    Case("unknown-name", body("param sigma : R = 1", "output u(x: X) = norm(x) / sigm"),
         CheckError, "unknown name `sigm`", "9:32", "did you mean `sigma`?"),
    Case("unknown-name-no-hint", out("norm(x) * qqq"), CheckError, "unknown name `qqq`", "8:32",
         "declare it before use"),
    Case("unknown-domain", out("integral(y: Yy) f(y)"), CheckError, "unknown domain `Yy`",
         "8:31", "did you mean `Y`?"),
    Case("domain-used-before-declaration", body("input g : Z -> R", "domain Z = index",
                                                "output u(x: X) = 1"),
         CheckError, "`Z` is used before its declaration", "8:15", "move the declaration of `Z`"),
    Case("kernel-used-before-declaration",
         body("output u(x: X) = integral(y: Y) k(x, y) * f(y)", "kernel k(x: X, y: Y) = 1"),
         CheckError, "`k` is used before its declaration (the kernel `k` is declared at line 9)",
         "8:37"),
    Case("field-on-wrong-domain", out("f(x)"), CheckError,
         "`f` lives on Y but `x` is a point of X", "8:22", "integral(y: Y)"),
    Case("field-on-wrong-domain-in-integral", out("integral(y: Y) f(x)"), CheckError,
         "`f` lives on Y but `x` is a point of X", "8:37", "evaluate it at `y`"),
    Case("width-mismatch", out("integral(y: Y) f(y) * y"), CheckError,
         "`*` of values of different widths: R^4 and R^3", "8:37", "same width"),
    Case("dot-unequal-widths", out("integral(y: Y) dot(f(y), y)"), CheckError,
         "`dot` of values of different widths: R^4 and R^3", "8:37"),
    Case("mlp-input-width", body("param phi : mlp(8 -> 4)",
                                 "output u(x: X) = integral(y: Y) phi(x, f(y))"),
         CheckError, "the mlp `phi` takes 8 inputs, but its arguments have 3 + 4 = 7", "9:37",
         "widths must add up"),
    Case("spline-arity", body("param W : spline(4, 4)", "output u(t: T) = W(t)"), CheckError,
         "the spline `W` is a function of 2 variables, got 1 argument", "9:22",
         "declared `spline(4, 4)`"),
    Case("spline-vector-argument", body("param W : spline(4)", "output u(x: X) = W(x)"),
         CheckError, "a spline argument must be a scalar", "9:24"),
    Case("component-out-of-range", out("x[3]"), CheckError,
         "component 3 is out of range for a vector of width 3", "8:22",
         "components are numbered 0 to 2"),
    Case("component-of-scalar", body("output u(t: T) = t[0]"), CheckError,
         "only a vector has components", "8:22"),
    Case("trapezoid-on-points", out("integral(y: Y) w(y) with trapezoid"), CheckError,
         "quadrature `trapezoid` works only on `grid` domains, but `Y` is `points`", "8:47",
         "on `points` use `sum`, `mean`, `weights`, `montecarlo`"),
    Case("montecarlo-on-grid", body("output u(t: T) = integral(s: T) s with montecarlo(8)"),
         CheckError, "quadrature `montecarlo` works only on `index` or `points` domains", "8:44"),
    Case("gauss-on-index", body("output u(i: I) = integral(j: I) j with gauss(4)"), CheckError,
         "quadrature `gauss` works only on `grid` domains", "8:44"),
    Case("unknown-quadrature", out("integral(y: Y) w(y) with simson"), CheckError,
         "unknown quadrature `simson`", "8:47", "did you mean `simpson`?"),
    Case("weights-not-scalar", out("integral(y: Y) w(y) with weights(f)"), CheckError,
         "the weights `f` must be a scalar field (R), but `f` is R^4", "8:55",
         "input f : Y -> R"),
    Case("weights-wrong-domain", body("input v : X -> R",
                                      "output u(x: X) = integral(y: Y) w(y) with weights(v)"),
         CheckError, "the weights `v` live on X, but the integral runs over Y", "9:55"),
    Case("weights-not-a-field", out("integral(y: Y) w(y) with weights(2)"), CheckError,
         "`weights(w)` needs the name of an input field", "8:55"),
    Case("gauss-with-sampled-field", body("input h : T -> R",
                                          "output u(t: T) = integral(s: T) h(s) with gauss(8)"),
         CheckError, "`gauss` evaluates the integrand between the points of `T`, but the field "
         "`h` is only known at them", "9:37", "use `trapezoid` or `simpson`"),
    Case("gauss-without-nodes", body("output u(t: T) = integral(s: T) s with gauss"),
         CheckError, "quadrature `gauss` takes 1 argument (the number of nodes), got 0", "8:44",
         "write `gauss(n)`"),
    Case("montecarlo-option-typo",
         out("integral(y: Y) w(y) with montecarlo(8, importnce = 1)"), CheckError,
         "quadrature `montecarlo` has no option `importnce`", "8:61",
         "did you mean `importance`?"),
    Case("montecarlo-zero-samples", out("integral(y: Y) w(y) with montecarlo(0)"), CheckError,
         "the number of samples must be an integer in [1, 16777216], got 0", "8:58"),
    Case("montecarlo-importance-twice",
         out("integral(y: Y) w(y) with montecarlo(4, importance = 1, importance = w(y))"),
         CheckError, "the option `importance` of `montecarlo` is given twice", "8:77",
         "importance = EXPR"),
    Case("midpoint-on-points", out("integral(y: Y) w(y) with midpoint(4)"), CheckError,
         "quadrature `midpoint` works only on `grid` domains, but `Y` is `points`", "8:47",
         "on `points` use `sum`, `mean`, `weights`, `montecarlo`"),
    Case("midpoint-without-n", body("output u(t: T) = integral(s: T) s with midpoint"),
         CheckError, "quadrature `midpoint` takes 1 argument (the number of cells), got 0",
         "8:44", "write `midpoint(n)`"),
    Case("midpoint-empty-parens", body("output u(t: T) = integral(s: T) s with midpoint()"),
         ParseError, "unexpected `)`; expected an expression", "8:53"),
    Case("midpoint-zero-cells", body("output u(t: T) = integral(s: T) s with midpoint(0)"),
         CheckError, "the number of midpoint cells must be an integer in [1, 1024], got 0",
         "8:53"),
    Case("midpoint-with-sampled-field",
         body("input h : T -> R", "output u(t: T) = integral(s: T) h(s) with midpoint(8)"),
         CheckError, "`midpoint` evaluates the integrand between the points of `T`, but the "
         "field `h` is only known at them", "9:37", "use `trapezoid` or `simpson`"),
    Case("gauss-too-many-nodes", body("output u(t: T) = integral(s: T) s with gauss(1e9)"),
         CheckError, "the number of Gauss nodes must be an integer in [1, 1024], got 1e+09",
         "8:50"),
    Case("gauss-nodes-out-of-range", body("output u(t: T) = integral(s: T) s with gauss(1e999)"),
         ParseError, "number `1e999` is out of range", "8:50"),
    Case("empty-file", "", CheckError, "no operator in bad.it", "1:1", "operator NAME { ... }"),
    Case("only-comments", "# an operator will go here\n\n", CheckError,
         "no operator in bad.it", "1:1", "operator NAME { ... }"),
    Case("integral-in-kernel", body("kernel k(x: X, y: Y) = integral(z: Y) w(z)",
                                    "output u(x: X) = integral(y: Y) k(x, y)"),
         CheckError, "an integral may only appear in an `output`", "8:28"),
    Case("nested-integrals", out("integral(y: Y) w(y) * (integral(z: Y) w(z))"), CheckError,
         "integrals cannot be nested", "8:45"),
    Case("integral-variable-out-of-scope", out("integral(y: Y) w(y) + w(y)"), CheckError,
         "`y` is not defined here: it is the variable of the integral at 8:31", "8:46",
         "parenthesise a sum"),
    Case("comparison-outside-bracket", out("(x[0] < 0.5) * 2"), CheckError,
         "a comparison is a condition, which is only allowed inside an Iverson bracket", "8:23",
         "write `[a < b]`"),
    Case("and-outside-bracket", out("x[0] < 1 and x[1] < 1"), CheckError,
         "`and` combines conditions", "8:22"),
    Case("bracket-without-condition", out("[x[0]]"), CheckError,
         "an Iverson bracket holds a condition", "8:23"),
    Case("duplicate-declaration", body("input f : X -> R"), CheckError,
         "`f` is already declared (line 6)", "8:11", "declared once"),
    Case("missing-output", body("param p : R"), CheckError, "operator `a` has no `output`",
         "1:10", "add one"),
    Case("two-outputs", body("output u(x: X) = 1", "output v(x: X) = 2"), CheckError,
         "an operator has exactly one `output`", "9:12"),
    Case("exponent-too-large", out("norm(x)^100"), CheckError,
         "exponent 100 is too large (the limit is 64)", "8:30"),
    Case("negative-exponent-too-large", out("norm(x)^-100"), CheckError,
         "exponent -100 is too large", "8:30"),
    Case("kernel-wrong-domain", body("kernel k(x: X, y: Y) = sqnorm(x - y)",
                                     "output u(x: X) = integral(y: Y) k(y, x) * w(y)"),
         CheckError, "kernel `k` takes a point of X here, but `y` is a point of Y", "9:39",
         "evaluate it at `x`"),
    Case("kernel-arity", body("kernel k(x: X, y: Y) = 1",
                              "output u(x: X) = integral(y: Y) k(x) * w(y)"),
         CheckError, "`k` takes 2 arguments, got 1", "9:37"),
    Case("kernel-calls-itself", body("kernel k(x: X, y: Y) = k(x, y)", "output u(x: X) = 1"),
         CheckError, "the kernel `k` calls itself", "8:28", "cannot be recursive"),
    Case("field-not-called", out("integral(y: Y) w * 2"), CheckError,
         "`w` is a field: evaluate it at a point of Y", "8:37", "write `w(y)`"),
    Case("field-at-number", out("integral(y: Y) w(2)"), CheckError,
         "the field `w` must be evaluated at a point variable (`x`, `y`), not at an expression",
         "8:39", "evaluate it at `y`, the point of Y here"),
    Case("point-called", out("x(1)"), CheckError, "`x` is a point, not a function", "8:22"),
    Case("domain-as-value", out("X"), CheckError, "`X` is a domain, not a value", "8:22"),
    Case("param-called", body("param s : R = 1", "output u(x: X) = s(x)"), CheckError,
         "the param `s` is a value, not a function", "9:22", "without arguments"),
    Case("builtin-redefined", body("param exp : R = 1"), CheckError,
         "`exp` is a built-in and cannot be redefined", "8:11"),
    Case("builtin-arity", out("exp(x[0], 2)"), CheckError, "`exp` takes 1 argument, got 2",
         "8:22"),
    Case("integration-variable-is-output-point", out("integral(x: Y) w(x)"), CheckError,
         "the integration variable `x` is already the output's point", "8:31"),
    Case("integration-variable-hides", out("integral(f: Y) w(f)"), CheckError,
         "the integration variable `f` hides the input `f`", "8:31"),
    Case("importance-not-scalar",
         out("integral(y: Y) w(y) with montecarlo(4, importance = f(y))"), CheckError,
         "the importance must be a scalar, but it is R^4", "8:74"),
    Case("operator-defined-twice", body("output u(x: X) = 1") + body("output u(x: X) = 1"),
         CheckError, "operator `a` is defined twice", "10:10", "first definition is at line 1"),
    Case("kernel-expansion-too-large",
         "operator a {\n    domain X = index\n    kernel k0(x: X, y: X) = x * y\n"
         + "".join(f"    kernel k{i + 1}(x: X, y: X) = k{i}(x, y) * k{i}(x, y)\n"
                   for i in range(20))
         + "    output u(x: X) = integral(y: X) k20(x, y)\n}\n",
         CheckError, "grows past 100000 nodes once its kernels are inlined", "18:42"),
    # ---- version 1: lattices, stencils, products, several variables ----
    Case("stencil-even-size", body("domain S = stencil(3, 4)"), ParseError,
         "a stencil's size must be odd", "8:27", "write 3 or 5"),
    Case("stencil-four-axes", body("domain S = stencil(3, 3, 3, 3)"), ParseError,
         "`stencil` takes 1, 2 or 3 arguments, got 4", "8:16"),
    Case("grid-box-reversed", body("domain S = grid((0, 1), (2, 1))"), ParseError,
         "a grid needs a < b, got (2, 1)", "8:29", "write `(1, 2)`"),
    Case("grid-mixed-boxes", body("domain S = grid((0, 1), 2)"), ParseError,
         "not a mix of both", "8:16"),
    Case("tuple-in-expression", out("(1, 2)"), CheckError,
         "a tuple `(a, b)` is only an axis of a grid's declaration", "8:22"),
    Case("read-non-integer-point", lat_out("integral(t: T) h(p + 0.5)[0]"), CheckError,
         "`h` is read at a non-integer point (0.5 is not an integer)", "8:49",
         "integer affine point"),
    Case("read-huge-offset", lat_out("integral(t: T) h(p + t + 1e30)[0]"), CheckError,
         "`h` is read at an affine point with the constant 1e+30, beyond ±2,147,483,647",
         "8:45", "small integers"),
    Case("read-at-grid-point", lat_out("integral(v: V) f(v, p + v)"), CheckError,
         "`f` is read at a non-integer point: `v` is a point of the grid `V`", "8:52"),
    Case("read-product-of-points", lat_out("integral(t: T) h(p * t)[0]"), CheckError,
         "`h` is read at a product of points", "8:45"),
    Case("read-axes-mismatch", lattice("domain K = stencil(3)",
                                       "output g(p: P) = integral(k: K) h(p + k)[0]"),
         CheckError, "`k` is a point of 1 axis but `P` has 2", "9:43"),
    Case("product-read-arity", lat_out("integral(t: T) f(p + t)"), CheckError,
         "`f` lives on V * P: it is read at 2 points, got 1", "8:43", "one point per domain"),
    Case("rule-list-wrong-length", lat_out("integral(v: V, t: T) f(v, p + t) with (trapezoid)"),
         CheckError, "the integral over 2 variables (v, t) has 1 rule", "8:67",
         "`with (trapezoid, sum)`"),
    Case("rule-list-wrong-kind", lat_out("integral(v: V, t: T) f(v, p + t) with (sum, simpson)"),
         CheckError, "quadrature `simpson` works only on `grid` domains, but `T` is `stencil`",
         "8:72"),
    Case("montecarlo-several-variables",
         lattice("domain I = index", "domain J = index",
                 "output g(p: P) = integral(i: I, j: J) h(p)[0] with montecarlo(4)"),
         CheckError, "`montecarlo` samples the points of one domain, but this integral runs "
         "over 2 variables", "10:56"),
    Case("integral-variable-twice", lat_out("integral(t: T, t: T) h(p + t)[0]"), CheckError,
         "`t` names two variables of the integral", "8:43"),
    Case("per-needs-fixed-domain", lattice("param W : spline(4, 4, per = P)",
                                           "output g(p: P) = h(p)[0]"), CheckError,
         "`per = P` needs a domain of fixed size", "8:34", "stencil"),
    Case("per-spline-arity", lattice("param W : spline(4, 4, per = T)",
                                     "output g(u: U, p: P) = integral(v: V, t: T) W(u, v) * "
                                     "f(v, p + t)"), CheckError,
         "the spline `W` is a function of 2 variables and a point of T, got 2 arguments",
         "9:49"),
    Case("per-spline-wrong-point", lattice("param W : spline(4, 4, per = T)",
                                           "output g(u: U, p: P) = integral(v: V, t: T) "
                                           "W(u, v, v) * f(v, p + t)"), CheckError,
         "the last argument of `W` is a point of T, but `v` is a point of V", "9:57"),
]


def _first(err: ItdslError) -> ItdslError:
    return err.errors[0] if isinstance(err, ItdslErrors) else err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error(case: Case):
    with pytest.raises(ItdslError) as info:
        load_source(case.source, "bad.it")
    err = _first(info.value)
    assert isinstance(err, case.cls), f"{type(err).__name__}: {err}"
    assert case.message in err.message, str(err)
    assert err.span is not None, str(err)
    assert f"{err.span.line}:{err.span.col}" == case.where, str(err)
    if case.hint is not None:
        assert err.hint is not None and case.hint in err.hint, str(err)
    rendered = err.render()
    assert rendered.startswith(f"bad.it:{case.where}: error: "), rendered


def test_enough_cases():
    assert len(CASES) >= 35
    assert len({c.id for c in CASES}) == len(CASES)
    kinds = {c.cls for c in CASES}
    assert kinds == {ParseError, CheckError}


def test_case_programs_differ_from_valid_ones_only_where_they_say():
    """The prelude itself (with an output) is a valid program, so each error comes from the
    line under test."""
    load_source(out("integral(y: Y) f(y) * w(y)"))


def test_several_errors_at_once():
    src = body("input g : Q -> R", "kernel k(x: X, y: Y) = sqnrm(x - y)",
               "output u(x: X) = integral(y: Y) f(x)")
    with pytest.raises(ItdslErrors) as info:
        load_source(src)
    errs = info.value.errors
    assert len(errs) >= 3
    assert all(isinstance(e, CheckError) for e in errs)
    assert [f"{e.span.line}:{e.span.col}" for e in errs] == ["8:15", "9:28", "10:37"]
    assert "3 errors" in info.value.render()


def test_several_builder_errors_at_once():
    src = body("domain Z = grid(1, 0)", "param W : spline(1)", "param p : R = norml(1)")
    with pytest.raises(ItdslErrors) as info:
        load_source(src)
    assert [type(e) for e in info.value.errors] == [ParseError] * 3


def test_failed_declaration_is_not_reported_again():
    """A kernel that fails to check is not reported a second time where it is used."""
    src = body("kernel k(x: X, y: Y) = exp(-sqnrm(x - y))",
               "output u(x: X) = integral(y: Y) k(x, y) * f(y)")
    with pytest.raises(CheckError) as info:  # exactly one error, not ItdslErrors
        load_source(src)
    assert "sqnrm" in info.value.message


def test_render_shows_line_and_caret():
    with pytest.raises(ItdslError) as info:
        load_source(out("f(x)"), "bad.it")
    lines = info.value.render().splitlines()
    assert lines[0] == "bad.it:8:22: error: `f` lives on Y but `x` is a point of X"
    assert lines[1] == "        output u(x: X) = f(x)"
    assert lines[2] == "                         ^~~~"
    assert lines[3].startswith("hint: ")


def test_render_quotes_the_line_the_lexer_counted():
    """Lines are counted at "\\n" only (as the lexer does), even with a form feed or a
    Unicode line separator in the text."""
    src = "operator a {\x0c\n    domain Z = pionts(3) # \u2028 odd\n}\n"
    with pytest.raises(ParseError) as info:
        load_source(src)
    lines = info.value.render().splitlines()
    assert lines[0] == "<string>:2:16: error: unknown domain kind `pionts`"
    assert lines[1].startswith("        domain Z = pionts(3)")


def test_render_shows_a_window_of_a_long_line():
    src = body("output u(x: X) = " + "1 + " * 60 + "qq" + " + 1" * 60)
    with pytest.raises(CheckError) as info:
        load_source(src)
    lines = info.value.render().splitlines()
    assert len(lines[1]) < 200 and lines[1].lstrip().startswith("...")
    caret = lines[2].index("^")
    assert lines[1][caret:caret + 2] == "qq" and lines[2][caret:] == "^~"


def test_render_caps_the_number_of_errors():
    src = body(*(f"param p{i} : R = norml(1)" for i in range(120)))
    with pytest.raises(ItdslErrors) as info:
        load_source(src)
    assert len(info.value.errors) == 120
    text = info.value.render()
    assert text.count("error: unknown initialiser") == 50
    assert "... and 70 more" in text and text.endswith("120 errors")


# ---- limits: huge or deeply nested input is an error, never a crash --------------------------


def test_file_size_cap():
    text = "# " + "x" * MAX_SOURCE_BYTES + "\n"
    with pytest.raises(ParseError, match="larger than"):
        parse(text)


def test_file_size_cap_on_disk(tmp_path):
    path = tmp_path / "big.it"
    path.write_text("#" * (MAX_SOURCE_BYTES + 1))
    with pytest.raises(ParseError, match="larger than"):
        parse_file(path)


@pytest.mark.parametrize("expr", [
    "(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH,
    "(" * (MAX_DEPTH - 1) + "x[0]" + ")" * (MAX_DEPTH - 1),  # the `[` of `x[0]` is level 128
])
def test_nesting_up_to_the_cap_is_fine(expr):
    load_source(body(f"output u(x: X) = {expr}"))


@pytest.mark.parametrize("expr", [
    "(" * 5000 + "1" + ")" * 5000,  # parentheses add no tree level, but count all the same
    "[(" * 300 + "x[0] < 1" + ")]" * 300,
    "-" * 5000 + "1",
    "+".join(["1"] * 5000),
    "x[0]" + "^x[0]" * 2000,
    "exp(" * 3000 + "1" + ")" * 3000,
    "integral(y: Y) " + " * ".join(["w(y)"] * 3000),
    "[" + " and ".join(["x[0] < 1"] * 3000) + "]",
    "[" + " < ".join(["x[0]"] * 3000) + "]",
])
def test_nesting_depth_cap(expr):
    with pytest.raises(ParseError, match=f"nested more than {MAX_DEPTH} levels"):
        load_source(body(f"output u(x: X) = {expr}"))


def test_kernel_inlining_depth_cap():
    """Kernels are inlined; a chain of them that each nest the previous one deeper is caught
    before it can exhaust Python's recursion limit."""
    chain = "".join(f"    kernel k{i + 1}(x: X, y: X) = " + "exp(" * 50 + f"k{i}(x, y)"
                    + ")" * 50 + "\n" for i in range(30))
    src = ("operator a {\n    domain X = index\n    kernel k0(x: X, y: X) = x\n" + chain
           + "    output u(x: X) = integral(y: X) k30(x, y)\n}\n")
    with pytest.raises(CheckError, match="levels deep \\(with the kernels it calls inlined\\)"):
        load_source(src)


def test_not_a_string():
    with pytest.raises(ParseError, match="as a str"):
        parse(b"operator a {}")  # type: ignore[arg-type]


def test_unreadable_file(tmp_path):
    with pytest.raises(ParseError, match="cannot read"):
        parse_file(tmp_path / "missing.it")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.it"
    path.write_bytes(b"operator a { # caf\xe9\n}\n")
    with pytest.raises(ParseError, match="not UTF-8"):
        parse_file(path)


# ---- the command line ---------------------------------------------------------------------------


def _itdsl(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itdsl", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def test_cli_check_reports_errors(tmp_path):
    bad = tmp_path / "bad.it"
    bad.write_text(out("f(x)"))
    res = _itdsl("check", str(bad))
    assert res.returncode == 1, res.stderr
    text = res.stdout + res.stderr
    assert "Traceback" not in text
    assert f"{bad}:8:22: error: `f` lives on Y but `x` is a point of X" in text
    assert "        output u(x: X) = f(x)\n" in text
    assert "                         ^~~~\n" in text


def test_cli_check_reports_parse_errors(tmp_path):
    bad = tmp_path / "bad.it"
    bad.write_text(out("f(x) ** 2"))
    res = _itdsl("check", str(bad))
    assert res.returncode == 1
    text = res.stdout + res.stderr
    assert "Traceback" not in text
    assert f"{bad}:8:27: error: `**` is not an operator" in text
    assert "^~" in text


def test_cli_check_good_and_bad(tmp_path):
    bad = tmp_path / "bad.it"
    bad.write_text("operator a {\n")
    res = _itdsl("check", "examples/gauss.it", str(bad))
    assert res.returncode == 1
    assert "examples/gauss.it: ok" in res.stdout
    assert f"{bad}:1:13: error: unexpected end of file" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr


def test_cli_check_missing_file(tmp_path):
    res = _itdsl("check", str(tmp_path / "nope.it"))
    assert res.returncode == 1
    assert "cannot read" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr
