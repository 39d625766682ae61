"""Compile two .it files, run them on random data, and check them against plain PyTorch."""

from pathlib import Path

import torch

import itdsl

HERE = Path(__file__).parent
torch.manual_seed(0)

# Gaussian kernel smoothing: u(x) = sum_y exp(-|x - y|^2 / 2s^2) b(y)
gauss = itdsl.compile_file(HERE / "gauss.it", target="reference")
op = gauss["gauss_smooth"]
x, y, b = torch.rand(500, 3), torch.rand(400, 3), torch.randn(400, 16)
u = op(X=x, Y=y, b=b)
expected = torch.exp(-torch.cdist(x, y) ** 2 / (2 * op.s**2)) @ b
print(f"gauss_smooth   X {list(x.shape)}, Y {list(y.shape)}, b {list(b.shape)} -> u {list(u.shape)}"
      f"   max |u - torch| = {(u - expected).abs().max().item():.2e}")

# Softmax attention written as a normalised integral, with batch and head dims.
attention = itdsl.compile_file(HERE / "attention.it", target="reference")
q, k, v = (torch.randn(2, 4, 128, 64) for _ in range(3))
for name, causal in (("attention", False), ("causal_attention", True)):
    o = attention[name](q=q, k=k, v=v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    print(f"{name:<16} q,k,v {list(q.shape)} -> o {list(o.shape)}"
          f"   max |o - sdpa| = {(o - sdpa).abs().max().item():.2e}")

# Gradients flow to inputs and params.
u.pow(2).sum().backward()
print(f"d loss / d s   = {op.s.grad.item():+.4f}  (param `s` of gauss.it, initial value "
      f"{op.s.item()})")
print()
print(gauss.explain("gauss_smooth"))
