"""Evidence (a): `.it` integral operators that are a Conv1d, an SDPA layer and an EMA exactly —
the special cases an ITNet kernel subsumes, written as kernels and compiled by itdsl, against
the torch layers themselves (random weights and inputs, float64 and float32).

    python -m experiments.itnet.exact
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import itdsl

C_IN, C_OUT, TAPS, T, BATCH = 6, 5, 5, 64, 4
HEADS, N, DH = 2, 48, 16

CONV1D = f"""operator conv1d {{
    domain U = grid(0, 1)            # output channels: a spline at its own nodes is its values
    domain V = grid(0, 1)            # input channels
    domain T = index
    domain K = stencil({TAPS})
    input  f : V * T -> R
    param  W : spline({C_OUT}, {C_IN}, per = K)
    param  c : spline({C_OUT})
    output g(u: U, t: T) = c(u) + integral(v: V, k: K) W(u, v, k) * f(v, t + k) with (sum, sum)
}}"""

SDPA = f"""operator sdpa {{
    domain I = index
    domain J = index
    input  q : I -> R^{DH}
    input  k : J -> R^{DH}
    input  v : J -> R^{DH}
    output o(i: I) = integral(j: J) exp(dot(q(i), k(j)) / sqrt({DH})) * v(j)
                   / integral(j: J) exp(dot(q(i), k(j)) / sqrt({DH}))
}}

operator causal_sdpa {{
    domain T = index
    input  q : T -> R^{DH}
    input  k : T -> R^{DH}
    input  v : T -> R^{DH}
    output o(t: T) = integral(s: T) [s <= t] * exp(dot(q(t), k(s)) / sqrt({DH})) * v(s)
                   / integral(s: T) [s <= t] * exp(dot(q(t), k(s)) / sqrt({DH}))
}}"""

EMA = """operator ema {
    domain T = index
    input  f : T -> R^8
    param  a : R^8 = 0.5
    output g(t: T) = integral(s: T) [s <= t] * exp(-softplus(a) * (t - s)) * f(s)
}"""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _ran(op, call) -> tuple[str, float]:
    err = call()
    return op.last_run, err


def conv1d(dtype: torch.dtype, strategy: str | None) -> tuple[str, float]:
    layer = torch.nn.Conv1d(C_IN, C_OUT, TAPS, padding=TAPS // 2).to(dtype)
    op = itdsl.compile_source(CONV1D, strategy=strategy)["conv1d"].to(dtype)
    with torch.no_grad():
        op.W.copy_(layer.weight.permute(2, 0, 1))  # [taps, out, in]: one spline per tap
        op.c.copy_(layer.bias)
        x = torch.randn(BATCH, C_IN, T, dtype=dtype)
        return _ran(op, lambda: _rel(op(f=x, U=C_OUT), layer(x)))


def sdpa(dtype: torch.dtype, strategy: str | None, causal: bool) -> tuple[str, float]:
    op = itdsl.compile_source(SDPA, strategy=strategy)["causal_sdpa" if causal else "sdpa"]
    q, k, v = (torch.randn(BATCH, HEADS, N, DH, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return _ran(op, lambda: _rel(op(q=q, k=k, v=v), want))


def ema(dtype: torch.dtype, strategy: str | None) -> tuple[str, float]:
    op = itdsl.compile_source(EMA, strategy=strategy)["ema"].to(dtype)
    with torch.no_grad():
        op.a.copy_(torch.linspace(-2, 2, 8))
        f = torch.randn(BATCH, T, 8, dtype=dtype)
        lam = torch.exp(-F.softplus(op.a))
        y, state = [], torch.zeros(BATCH, 8, dtype=dtype)
        for t in range(T):  # the recurrence y_t = λ·y_{t−1} + f_t
            state = lam * state + f[:, t]
            y.append(state)
        return _ran(op, lambda: _rel(op(f=f), torch.stack(y, 1)))


CASES = {"Conv1d (6→5 channels, 5 taps)": conv1d,
         "SDPA (2 heads, n = 48)": lambda d, s: sdpa(d, s, False),
         "causal SDPA": lambda d, s: sdpa(d, s, True),
         "EMA (8 channels, T = 64)": ema}


def rows() -> list[dict]:
    """One row per case, dtype and path (the strategy itdsl picks, then its generated dense
    kernels): what ran and the relative L2 error against the torch layer."""
    out = []
    for dtype in (torch.float64, torch.float32):
        for case, fn in CASES.items():
            for strategy in (None, "dense"):
                torch.manual_seed(0)
                run, err = fn(dtype, strategy)
                out.append({"case": case, "dtype": str(dtype).removeprefix("torch."),
                            "ran": run, "rel_l2": err})
    return out


def main() -> None:
    print("| special case | dtype | itdsl ran | relative L2 error against torch |")
    print("|---|---|---|---|")
    for r in rows():
        print(f"| {r['case']} | {r['dtype']} | {r['ran']} | {r['rel_l2']:.1e} |")


if __name__ == "__main__":
    main()
