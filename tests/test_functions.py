"""Every elementwise function of the table (itdsl/functions/) in every stage.

Each function of the language is compiled on its own, `out(x) = Σ_y F(v, w) · b(y)` over a
single y = 1 with v = x[0]·y[0] and w = x[1]·y[0], and run at every pair (v, w) of special
values (0, ±1, large, ±inf, NaN) on every path: the reference, the Plan evaluator, the TVM
kernels in float32 and float64. Its value and its derivatives in v and w must be torch's
(the entry's torch form under torch.autograd) as docs/language.md "Special values" states:
NaN and ±inf where torch has them; a derivative that is not finite may be NaN where torch's
is ±inf or the reverse (a symbolic derivative, not autograd's chain rule). The sympy forms
and sympy's derivatives are checked at finite points. Functions of plans only (erf, sign,
where) are checked through the derivatives they appear in.
"""

from __future__ import annotations

import functools
import math

import pytest
import sympy as sp
import torch
from util import ROOT

import itdsl
from itdsl.frontend import ir, load_source
from itdsl.frontend.check import BUILTINS
from itdsl.functions import ACTIVATIONS, FUNCTIONS
from itdsl.lowering.spec import LET_DEPTH
from itdsl.runtime.binding import bind
from itdsl.runtime.params import ACTIVATION_MODULES
from itdsl.runtime.plan_eval import evaluate_backward, evaluate_plan
from itdsl.runtime.reference import ReferenceOperator
from itdsl.symbolic import pexpr as P
from itdsl.symbolic.build import build_plan
from itdsl.symbolic.derivatives import A, sympy_partials
from itdsl.symbolic.tosympy import apply

D = torch.float64
LANGUAGE = sorted(name for name, f in FUNCTIONS.items() if f.syntax != "internal")
INTERNAL = sorted(name for name, f in FUNCTIONS.items() if f.syntax == "internal")
VALUES = [0.0, 1.0, -1.0, 0.5, 2.5, -3.0, 30.0, -30.0, 1e30, -1e30, math.inf, -math.inf,
          math.nan]
FINITE = [v for v in VALUES if math.isfinite(v) and abs(v) < 1e6]


def _pairs(values: list[float], dtype=D) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    return torch.cartesian_prod(t, t)  # [n², 2]: (v, w)


def _body(f) -> str:
    v, w = "(x[0] * y[0])", "(x[1] * y[0])"
    if f.syntax == "prefix":
        return f"{f.name}{v}".replace("neg", "-")
    if f.condition == "compare":
        return f"[{v} {f.name} {w}]"
    if f.condition == "logic":
        return f"[{v} < 0.5 {f.name} {w} < 0.5]"
    if f.syntax == "infix":
        return f"{v} {f.name} {w}"
    return f"{f.name}({', '.join([v, w][:f.arity])})"


def _text(name: str) -> str:
    return f"""operator f {{
        domain X = points(2)
        domain Y = points(1)
        input  b : Y -> R
        output u(x: X) = integral(y: Y) ({_body(FUNCTIONS[name])}) * b(y) with sum
    }}"""


def _args(f, vw: torch.Tensor) -> list[torch.Tensor]:
    args = [vw[:, 0], vw[:, 1]][:f.arity]
    if f.condition == "logic":  # of two brackets
        args = [(a < 0.5).to(a.dtype) for a in args]
    return args


def _torch(name: str, vw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The entry's torch form at the pairs and its gradient in (v, w), by autograd."""
    f = FUNCTIONS[name]
    vw = vw.clone().requires_grad_(True)
    out = f.torch(torch, *_args(f, vw))
    out = out.to(vw.dtype) if out.dtype == torch.bool else out
    if not out.requires_grad:
        return out.detach(), torch.zeros_like(vw)
    (g,) = torch.autograd.grad(out.sum(), vw)
    return out.detach(), g


def _same(got: torch.Tensor, want: torch.Tensor, what: str, rel: float, atol: float,
          exact_specials: bool) -> None:
    """NaN and ±inf where `want` has them (`exact_specials`: which one, and the sign of an
    inf; else only where it is not finite), and close elsewhere."""
    bad = ~torch.isfinite(want)
    assert torch.equal(~torch.isfinite(got), bad), \
        f"{what}: not finite at other places: {got[~torch.isfinite(got) ^ bad]} " \
        f"where torch gives {want[~torch.isfinite(got) ^ bad]}"
    if exact_specials:
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN at other places"
        inf = torch.isinf(want)
        assert torch.equal(got[inf], want[inf]), f"{what}: inf of another sign"
    fin = ~bad
    err = (got[fin] - want[fin]).abs() - rel * want[fin].abs()
    assert err.numel() == 0 or err.max().item() <= atol, \
        f"{what}: error {err.max().item():.2e}"


@functools.cache
def _checked(name: str) -> ir.Operator:
    return load_source(_text(name))["f"]


def _plan_path(name: str, vw: torch.Tensor):
    op = _checked(name)
    module = ReferenceOperator(op).double()
    X = vw.clone().requires_grad_(True)
    call = dict(X=X, Y=torch.ones(1, 1, dtype=D), b=torch.ones(1, dtype=D))
    plan = build_plan(op, "dense")
    out, ev = evaluate_plan(plan, module, bind(op, call, D))
    got = evaluate_backward(plan, ev, torch.ones_like(out))
    return out.detach(), got.get("coords:X", torch.zeros_like(vw))


def _module_path(name: str, vw: torch.Tensor, target: str):
    kw = {} if target == "reference" else {"strategy": "dense"}
    op = itdsl.compile_source(_text(name), target=target, **kw)["f"]
    X = vw.clone().requires_grad_(True)
    out = op(X=X, Y=torch.ones(1, 1, dtype=vw.dtype), b=torch.ones(1, dtype=vw.dtype))
    if not out.requires_grad:  # (a bracket of the reference: no graph)
        return out.detach(), torch.zeros_like(vw)
    (g,) = torch.autograd.grad(out.sum(), X, allow_unused=True)
    return out.detach(), torch.zeros_like(vw) if g is None else g


# Where a path knowingly differs from torch, by function (none now: relu'(NaN) was 0 and
# [a != b] with a NaN was 0 in the kernels, both found by this test and fixed).
DERIVATIVE_DIFFERS: dict = {}
VALUE_DIFFERS: dict = {}

PATHS = {
    "reference": (D, lambda name, vw: _module_path(name, vw, "reference")),
    "plan": (D, _plan_path),
    "tvm64": (D, lambda name, vw: _module_path(name, vw, "cpu")),
    "tvm32": (torch.float32, lambda name, vw: _module_path(name, vw, "cpu")),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", LANGUAGE)
def test_every_path_computes_every_function_as_torch(name, path):
    dtype, run = PATHS[path]
    vw = _pairs(VALUES, dtype)
    want, dwant = _torch(name, vw)
    got, dgot = run(name, vw)
    # float32: exp near the overflow is the fast polynomial's few ulps, subnormals may be 0,
    # erf is a rational approximation within 2e-7 (1 + erf(x) of gelu at x < 0 loses digits)
    rel, atol = (2e-6, 1e-6) if dtype == torch.float32 else (1e-12, 1e-300)
    keep = ~VALUE_DIFFERS[name, path](vw) if (name, path) in VALUE_DIFFERS else slice(None)
    _same(got[keep], want[keep], f"{name} on {path}", rel, atol, exact_specials=True)
    # derivatives: the symbolic form (sigmoid's s(1 - s), gelu's) against autograd's chain
    rel, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-14)
    keep = torch.ones(vw.shape[0], dtype=torch.bool)
    if path != "reference" and name in DERIVATIVE_DIFFERS:
        keep = ~DERIVATIVE_DIFFERS[name](vw)
    for k in range(2):
        _same(dgot[keep, k], dwant[keep, k], f"d{name}/d{'vw'[k]} on {path}", rel, atol,
              exact_specials=False)


@pytest.mark.parametrize("name", [n for n in FUNCTIONS if FUNCTIONS[n].sympy or
                                  FUNCTIONS[n].opaque])
def test_sympy_form_and_derivatives_are_torchs(name):
    """At finite points: the sympy form's value (where numbers evaluate: not min and max,
    opaque without a formula), and the partials sympy derives (where the entry does not
    state its own), equal the torch form and its autograd."""
    f = FUNCTIONS[name]
    vw = _pairs(FINITE)
    want, dwant = _torch(name, vw)
    args = _args(f, vw)
    partials = sympy_partials(name) if f.partials is None else ()
    for i in range(vw.shape[0]):
        point = [sp.Float(float(a[i])) for a in args]
        if math.isfinite(want[i]) and not (f.opaque and f.opaque.formula is None):
            value = complex(apply(name, *point).evalf())
            assert value.imag == 0 and math.isclose(value.real, want[i], rel_tol=1e-12,
                                                   abs_tol=1e-12), (name, point)
        for k, d in enumerate(partials):
            if math.isfinite(dwant[i, k]):
                value = complex(d.xreplace(dict(zip(A, point))).evalf())
                assert value.imag == 0 and math.isclose(value.real, dwant[i, k], rel_tol=1e-10,
                                                       abs_tol=1e-12), (name, k, point)


@pytest.mark.parametrize("name", INTERNAL)
def test_functions_of_plans_only_appear_in_a_derivative(name):
    """erf, sign and where are reached through the gradients of language functions, so the
    paths above run them."""
    used = set()
    for lang in LANGUAGE:
        plan = build_plan(_checked(lang), "dense")
        used |= {n.op for n in P.toposort([s.expr for s in plan.backward.steps])}
    assert name in used


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_stage_has_its_form(name):
    f = FUNCTIONS[name]
    assert f.torch is not None and f.tvm is not None, name
    assert name in P.ELEMENTWISE
    assert LET_DEPTH.get(name, 0) == f.let_depth
    if f.syntax == "internal":
        return
    assert ir.Fn(name).name == f.fn_member
    assert f.numpy is not None and (f.sympy is not None or f.opaque is not None), name
    if f.syntax == "call":
        assert name in BUILTINS
        doc = (ROOT / "docs/language.md").read_text()
        builtins = doc.split("**Built-ins.**")[1].split("Vector helpers")[0]
        assert f"`{name}`" in builtins or f" {name} " in builtins or f"`{name} " in \
            builtins or f" {name}`" in builtins, f"docs/language.md: list `{name}` in Built-ins"


def test_mlp_activations_have_modules():
    assert set(ACTIVATIONS) == set(ACTIVATION_MODULES)
    assert {"gelu", "relu", "tanh", "sigmoid", "softplus", "silu", "identity"} <= set(ACTIVATIONS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_torch_form_is_the_formula_with_a_fused_backward(dtype):
    """The torch form of gelu (torch's fused gelu and gelu_backward) gives the written
    formula x/2·(1 + erf(x/√2)): its values, signs of zero, NaN and ±inf on long vectors
    (the vectorised paths), and its gradients, to rounding; double backward works."""
    from itdsl.runtime.reference import elementwise
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -30.0, 30.0, 1e30, -1e30,
                            math.inf, -math.inf, math.nan], dtype=dtype)
    x = torch.cat([special, torch.randn(997, dtype=dtype, generator=torch.Generator()
                                        .manual_seed(0)) * 4, special])
    xf = x.clone().requires_grad_(True)
    want = 0.5 * xf * (1 + torch.erf(xf / math.sqrt(2.0)))
    xg = x.clone().requires_grad_(True)
    got = elementwise("gelu", [xg], dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert torch.equal(torch.signbit(got[ok]), torch.signbit(want[ok]))
    torch.testing.assert_close(got[ok], want[ok].detach())
    g = torch.randn_like(x)
    (dw,) = torch.autograd.grad(want, xf, g)
    (dg,) = torch.autograd.grad(got, xg, g)
    torch.testing.assert_close(dg, dw, equal_nan=True)
    if dtype == torch.float64:
        y = torch.randn(16, dtype=dtype, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda t: elementwise("gelu", [t], dtype), (y,))
