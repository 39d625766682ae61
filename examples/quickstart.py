"""Compile two .it files for the CPU, run them on random data, check them against PyTorch."""

import time
from pathlib import Path

import torch

import itdsl

HERE = Path(__file__).parent
torch.manual_seed(0)

# Gaussian kernel smoothing: u(x) = sum_y exp(-|x - y|^2 / 2s^2) b(y)
t0 = time.perf_counter()
gauss = itdsl.compile_file(HERE / "gauss.it")
op = gauss["gauss_smooth"]
x, y, b = torch.rand(4000, 3), torch.rand(3000, 3), torch.randn(3000, 16)
u = op(X=x, Y=y, b=b)
expected = torch.exp(-torch.cdist(x, y) ** 2 / (2 * op.s**2)) @ b
rel = ((u - expected).abs().max() / expected.abs().max()).item()
print(f"gauss_smooth     X {list(x.shape)}, Y {list(y.shape)}, b {list(b.shape)} -> u "
      f"{list(u.shape)}   max |u - torch| / max |torch| = {rel:.1e}   "
      f"(strategy {op.strategy}; first call incl. compile {time.perf_counter() - t0:.1f} s)")

# Gradients flow to inputs and params through the compiled backward kernels.
u.square().mean().backward()
print(f"d loss / d s   = {op.s.grad.item():+.5f}  (param `s` of gauss.it, initial value "
      f"{op.s.item()})")

# Softmax attention written as a normalised integral, with batch and head dims. Plain
# attention is recognised and handed to torch's own kernel (scaled_dot_product_attention).
attention = itdsl.compile_file(HERE / "attention.it")
q, k, v = (torch.randn(2, 4, 256, 64) for _ in range(3))
for name, causal in (("attention", False), ("causal_attention", True)):
    o = attention[name](q=q, k=k, v=v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    print(f"{name:<16} q,k,v {list(q.shape)} -> o {list(o.shape)}"
          f"   max |o - sdpa| = {(o - sdpa).abs().max().item():.1e}   "
          f"(strategy {attention[name].strategy})")

# An exponential moving average is recognised as a recurrence and runs as a chunked scan.
ema = itdsl.compile_file(HERE / "ema.it")["ema"]
f = torch.randn(3, 20_000, 16)
g = ema(f=f)
lam, state, worst = torch.exp(-torch.nn.functional.softplus(ema.a.detach())), 0.0, 0.0
for t in range(0, f.shape[1]):  # the recurrence, step by step
    state = lam * state + f[:, t]
    if t % 997 == 0:
        worst = max(worst, (g[:, t] - state).abs().max().item())
print(f"ema              f {list(f.shape)} -> g {list(g.shape)}   max |g - loop| = {worst:.1e}   "
      f"(strategy {ema.strategy})")

print()
print(gauss.explain("gauss_smooth"))
