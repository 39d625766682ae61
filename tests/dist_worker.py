"""One rank of the distributed tests (tests/test_distributed.py starts W of them):

    python tests/dist_worker.py RANK WORLD INIT_FILE SUITE

Every rank builds the same data from fixed seeds, computes the one-process result itself (the
operator on the whole of X and Y, torch autograd for the gradients) and compares its own part
of the sharded call with it. It prints a line per check and exits non-zero on any mismatch.
"""

from __future__ import annotations

import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import itdsl
from itdsl import distributed as itdist
from itdsl.distributed.shard import draw_seed
from itdsl.errors import InputError

TOL = dict(rtol=1e-10, atol=1e-10)

# ranks' slices: of X (their own output points) and of Y (the sharded domain), uneven, and
# one empty slice of each on three ranks
SLICES = {2: ([3, 4], [6, 3]), 3: ([2, 4, 0], [4, 0, 5])}

PROGRAM = """
operator g_sum {
    domain X = points(2)
    domain Y = points(2)
    input  b : Y -> R^3
    param  s : R = 0.7
    output u(x: X) = integral(y: Y) exp(-sqnorm(x - y) / (2 * s^2)) * b(y) with sum
}
operator g_mean {
    domain X = points(2)
    domain Y = points(2)
    input  b : Y -> R^3
    param  s : R = 0.7
    output u(x: X) = integral(y: Y) exp(-sqnorm(x - y) / (2 * s^2)) * b(y) with mean
}
operator g_weights {
    domain X = points(2)
    domain Y = points(2)
    input  b : Y -> R^3
    input  w : Y -> R
    output u(x: X) = integral(y: Y) exp(-sqnorm(x - y)) * b(y) with weights(w)
}
operator ratio {
    domain X = points(2)
    domain Y = points(2)
    input  b : Y -> R^3
    param  s : R = 0.7
    kernel k(x: X, y: Y) = exp(-sqnorm(x - y) / s)
    output u(x: X) = integral(y: Y) k(x, y) * b(y) / integral(y: Y) k(x, y)
}
operator attention {
    domain I = index
    domain J = index
    input  q : I -> R^4
    input  k : J -> R^4
    input  v : J -> R^2
    output o(i: I) = integral(j: J) exp(dot(q(i), k(j))) * v(j) / integral(j: J) exp(dot(q(i), k(j)))
}
operator decay {
    domain I = index
    domain J = index
    input  q : I -> R
    input  v : J -> R^2
    output o(i: I) = integral(j: J) exp(-j / 4 + q(i)) * v(j)
}
operator mlp_kernel {
    domain X = points(2)
    domain Y = points(2)
    input  b : Y -> R^2
    param  m : mlp(4 -> 8 -> 1, act = tanh)
    output u(x: X) = integral(y: Y) m(x, y) * b(y) with mean
}
operator product {
    domain X = points(1)
    domain V = index
    domain Y = points(1)
    input  f : V * Y -> R^2
    output u(x: X, v: V) = integral(y: Y) exp(-sqnorm(x - y)) * f(v, y)
}
operator sampled {
    domain X = points(2)
    domain Y = points(2)
    input  b : Y -> R^3
    output u(x: X) = integral(y: Y) exp(-sqnorm(x - y)) * b(y) with montecarlo(4)
}
"""

GRID = """
operator on_grid {
    domain X = points(1)
    domain Y = grid(0, 1)
    input  f : Y -> R
    output u(x: X) = integral(y: Y) sin(x[0] * y) * f(y) with RULE
}
operator sized {
    domain X = points(1)
    domain Y = grid(0, 1)
    output u(x: X) = integral(y: Y) sin(x[0] * y) * y with RULE
}
"""


def _pieces(t: torch.Tensor, sizes: list[int], dim: int) -> list[torch.Tensor]:
    return list(torch.split(t, sizes, dim))


def check_case(name: str, op, rank: int, world: int, xs: dict, ys: dict, dims: dict,
               extra: dict | None = None, generator_seed: int | None = None,
               ring: bool | None = False) -> None:
    """Compare the sharded call with the one-process call: output rows, the gradients of
    every tensor (X's and Y's, local slices) and of the params (summed over ranks).

    xs: tensors on the output side {name: (tensor, dim)}; ys: on the sharded side; extra:
    arguments passed as they are; dims: {"X": sizes, "Y": sizes} per rank."""
    torch.manual_seed(123)
    xsz, ysz = dims["X"], dims["Y"]
    leaves = {n: t.clone().requires_grad_() for n, (t, _) in {**xs, **ys}.items()}
    full_gen = None
    if generator_seed is not None:
        g = torch.Generator().manual_seed(generator_seed)
        full_gen = torch.Generator().manual_seed(draw_seed(g))
    full_extra = dict(extra or {})
    if dims.get("size_given"):
        full_extra[dims["over"]] = sum(ysz)
    out = op(**leaves, **full_extra, generator=full_gen)
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    (out * cot).sum().backward()
    ref_grads = {n: t.grad for n, t in leaves.items()}
    ref_params = {n: p.grad.clone() for n, p in op.named_parameters()}
    op.zero_grad()

    sop = itdist.shard(op, over=dims["over"], ring=ring)
    name = f"{name} ({'ring' if sop.ring else 'all-gather'})"
    local = {}
    for n, (t, dim) in xs.items():
        local[n] = _pieces(t, xsz, dim)[rank].clone().requires_grad_()
    for n, (t, dim) in ys.items():
        local[n] = _pieces(t, ysz, dim)[rank].clone().requires_grad_()
    call_extra = dict(extra or {})
    if dims.get("size_given"):
        call_extra[dims["over"]] = ysz[rank]
    gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    u = sop(**local, **call_extra, generator=gen)
    out_dim = dims.get("out_dim", 0)
    want = _pieces(out.detach(), xsz, out_dim)[rank]
    torch.testing.assert_close(u, want, **TOL, msg=f"{name}: output")
    c = _pieces(cot, xsz, out_dim)[rank]
    (u * c).sum().backward()
    for n, (_, dim) in xs.items():
        if ref_grads[n] is not None:
            torch.testing.assert_close(local[n].grad, _pieces(ref_grads[n], xsz, dim)[rank],
                                       **TOL, msg=f"{name}: grad of {n}")
    for n, (_, dim) in ys.items():
        if ref_grads[n] is not None:
            torch.testing.assert_close(local[n].grad, _pieces(ref_grads[n], ysz, dim)[rank],
                                       **TOL, msg=f"{name}: grad of {n}")
    itdist.all_reduce_grads(sop)
    for n, p in op.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[n], **TOL, msg=f"{name}: grad of {n}")
    op.zero_grad()
    print(f"rank {rank}: {name} ok", flush=True)


def suite_operators(rank: int, world: int) -> None:
    xsz, ysz = SLICES[world]
    nx, ny = sum(xsz), sum(ysz)
    prog = itdsl.compile_source(PROGRAM)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    X, Y, b = rnd(nx, 2), rnd(ny, 2), rnd(ny, 3)
    w = rnd(ny).abs()
    sizes = {"X": xsz, "Y": ysz, "over": "Y"}
    for ring in (False, True):  # the ring where the operator allows it, and the all-gather
        for name in ("g_sum", "g_mean"):
            op = prog[name].double()
            check_case(name, op, rank, world, {"X": (X, 0)}, {"Y": (Y, 0), "b": (b, 0)}, sizes,
                       ring=ring)
        op = prog["g_weights"].double()
        check_case("g_weights", op, rank, world, {"X": (X, 0)},
                   {"Y": (Y, 0), "b": (b, 0), "w": (w, 0)}, sizes, ring=ring)
        torch.manual_seed(5)
        op = prog["mlp_kernel"].double()
        check_case("mlp_kernel", op, rank, world, {"X": (X, 0)},
                   {"Y": (Y, 0), "b": (b[:, :2], 0)}, sizes, ring=ring)
    check_case("ratio", prog["ratio"].double(), rank, world, {"X": (X, 0)},
               {"Y": (Y, 0), "b": (b, 0)}, sizes, ring=None)
    op = prog["sampled"].double()
    check_case("sampled", op, rank, world, {"X": (X, 0)}, {"Y": (Y, 0), "b": (b, 0)}, sizes,
               generator_seed=11)
    # index domains: the keys' positions are global (`decay` reads j)
    q4, k4, v2, q1 = rnd(nx, 4), rnd(ny, 4), rnd(ny, 2), rnd(nx)
    isz = {"X": xsz, "Y": ysz, "over": "J"}
    check_case("attention", prog["attention"].double(), rank, world, {"q": (q4, 0)},
               {"k": (k4, 0), "v": (v2, 0)}, isz)
    check_case("decay", prog["decay"].double(), rank, world, {"q": (q1, 0)},
               {"v": (v2, 0)}, isz)
    # a field on V * Y: the sharded axis is its second; the output is [n_X, n_V, 2]
    f = rnd(5, ny, 2)
    Xb, Yb, bb = rnd(2, nx, 2), rnd(2, ny, 2), rnd(2, ny, 3)
    for ring in (False, True):
        check_case("product", prog["product"].double(), rank, world, {"X": (X[:, :1], 0)},
                   {"Y": (Y[:, :1], 0), "f": (f, 1)}, sizes, ring=ring)
        # batched: leading batch dims broadcast, every rank the same
        check_case("g_sum batched", prog["g_sum"].double(), rank, world, {"X": (Xb, 1)},
                   {"Y": (Yb, 1), "b": (bb, 1)}, {**sizes, "out_dim": 1}, ring=ring)


def suite_grids(rank: int, world: int) -> None:
    """Grid quadratures: the ends are the global ends, the points the whole grid's; a grid
    given by its size only (`Y=n`) too."""
    xsz, ysz = SLICES[world]
    nx, ny = sum(xsz), sum(ysz)
    gen = torch.Generator().manual_seed(1)
    X = torch.rand(nx, 1, dtype=torch.float64, generator=gen) * 3
    f = torch.randn(ny, dtype=torch.float64, generator=gen)
    for rule in ("trapezoid", "simpson", "riemann", "sum", "mean"):
        prog = itdsl.compile_source(GRID.replace("RULE", rule))
        check_case(f"on_grid {rule}", prog["on_grid"].double(), rank, world, {"X": (X, 0)},
                   {"f": (f, 0)}, {"X": xsz, "Y": ysz, "over": "Y"})
        check_case(f"sized {rule}", prog["sized"].double(), rank, world, {"X": (X, 0)}, {},
                   {"X": xsz, "Y": ysz, "over": "Y", "size_given": True})


def suite_errors(rank: int, world: int) -> None:
    """A call inconsistent across ranks raises an itdsl error on every rank, without a hang."""
    op = itdsl.compile_source(PROGRAM)["g_sum"].double()
    sop = itdist.shard(op, over="Y")
    X = torch.randn(3, 2, dtype=torch.float64)
    width = 3 if rank == 0 else 2  # rank 1 passes a field of another width
    try:
        sop(X=X, Y=torch.randn(2, 2, dtype=torch.float64),
            b=torch.randn(2, width, dtype=torch.float64))
    except InputError as e:
        assert any(w in str(e) for w in ("differ", "could not make", "b")), str(e)
        print(f"rank {rank}: mismatch raised: {str(e).splitlines()[0]}", flush=True)
    else:
        raise AssertionError("no error for a field whose width differs between ranks")
    try:  # one rank passes no slice at all: its error there, a pointer to it elsewhere
        kw = {"Y": torch.randn(2, 2, dtype=torch.float64),
              "b": torch.randn(2, 3, dtype=torch.float64)} if rank else {}
        sop(X=X, **kw)
    except InputError as e:
        print(f"rank {rank}: missing slice raised: {str(e).splitlines()[0]}", flush=True)
    else:
        raise AssertionError("no error for a rank that passed nothing on Y")


def suite_kernels(rank: int, world: int) -> None:
    """The tiled kernels (not the small-call path) and the attention strategy's own
    algorithm under the sharded call."""
    itdsl.set_small_pairs(0)
    xsz, ysz = [40 * s for s in SLICES[world][0]], [30 * s for s in SLICES[world][1]]
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(sum(xsz), 2, dtype=torch.float64, generator=gen)
    Y = torch.randn(sum(ysz), 2, dtype=torch.float64, generator=gen)
    b = torch.randn(sum(ysz), 3, dtype=torch.float64, generator=gen)
    prog = itdsl.compile_source(PROGRAM, target="cpu")
    for name, ran, ring in (("g_sum", "kernels", False), ("g_sum", "kernels", True),
                            ("ratio", "attention", None)):
        op = prog[name].double()
        check_case(f"{name} ({ran})", op, rank, world, {"X": (X, 0)},
                   {"Y": (Y, 0), "b": (b, 0)}, {"X": xsz, "Y": ysz, "over": "Y"}, ring=ring)
        assert op.last_run == (ran if xsz[rank] else "empty"), (name, op.last_run)


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


def suite_ddp(rank: int, world: int) -> None:
    """DDP of a model with an itdsl op, eager and under torch.compile; and of an INN whose
    widths differ per rank. The reference: every rank's gradient computed here, one process,
    averaged (what DDP's all-reduce gives)."""
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    from itdsl import inn

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.op = itdsl.compile_source(PROGRAM, target="cpu")["g_sum"]
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, X, Y, b, reduce=torch.mean):
            return reduce(self.lin(self.op(X=X, Y=Y, b=b)).pow(2))

    torch.manual_seed(0)
    base = Net().double()
    gen = torch.Generator().manual_seed(3)
    data = [tuple(torch.randn(2, n, c, dtype=torch.float64, generator=gen)
                  for n, c in ((20, 2), (30, 2), (30, 3))) for _ in range(world)]
    want = []
    for batch in data:
        net = copy.deepcopy(base)
        net(*batch).backward()
        want.append(_grads(net))
    mean = [sum(g) / world for g in zip(*want)]
    # eager; torch.compile of the DDP module (DDP's own code breaks the graph); DDP of a
    # module compiled whole (fullgraph: the itdsl op traced without a break)
    for how in ("eager", "compile(DDP(m))", "DDP(compile(m, fullgraph))"):
        model = copy.deepcopy(base)
        if how == "compile(DDP(m))":
            net = DDP(model)
            run = torch.compile(net, backend="aot_eager")
        elif how == "eager":
            run = net = DDP(model)
        else:
            run = net = DDP(torch.compile(model, backend="aot_eager", fullgraph=True))
        run(*data[rank]).backward()
        for k, (got, ref) in enumerate(zip(_grads(model), mean)):
            torch.testing.assert_close(got, ref, **TOL, msg=f"DDP {how}: param {k}")
        print(f"rank {rank}: DDP {how} ok", flush=True)

    # a sharded op inside DDP, on DDP's own process group: the collectives of the shard's
    # backward and DDP's gradient buckets interleave alike on every rank. DDP averages the
    # ranks' shares, so the params get the total loss's gradient / W.
    xsz, ysz = SLICES[world]
    X = torch.randn(sum(xsz), 2, dtype=torch.float64, generator=gen)
    Y = torch.randn(sum(ysz), 2, dtype=torch.float64, generator=gen)
    b = torch.randn(sum(ysz), 3, dtype=torch.float64, generator=gen)
    ref = copy.deepcopy(base)
    ref(X, Y, b, reduce=torch.sum).backward()
    model = copy.deepcopy(base)
    model.op = itdist.shard(model.op, over="Y")
    net = DDP(model)
    xr, yr, br = (torch.split(t, sz)[rank] for t, sz in ((X, xsz), (Y, ysz), (b, ysz)))
    net(xr, yr, br, reduce=torch.sum).backward()
    for k, (got, r) in enumerate(zip(_grads(model), _grads(ref))):
        torch.testing.assert_close(got, r / world, **TOL, msg=f"DDP of a sharded op: param {k}")
    print(f"rank {rank}: DDP of a sharded op ok", flush=True)

    # an INN whose channel groups have another width on every rank
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 4)).double()
    x = torch.randn(world, 8, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (world, 8), generator=gen)
    net = inn.convert(mlp.train(), x[0])
    widths = [{g: n - 3 * j for g, n in net.groups.items()} for j in range(world)]
    want = []
    for j in range(world):
        one = copy.deepcopy(net)
        one.grid.sizes.update(widths[j])
        torch.nn.functional.cross_entropy(one(x[j]), y[j]).backward()
        want.append(_grads(one))
    mean = [sum(g) / world for g in zip(*want)]
    mine = copy.deepcopy(net)
    mine.grid.sizes.update(widths[rank])
    ddp = DDP(mine)
    torch.nn.functional.cross_entropy(ddp(x[rank]), y[rank]).backward()
    for k, (got, ref) in enumerate(zip(_grads(mine), mean)):
        torch.testing.assert_close(got, ref, **TOL, msg=f"INN DDP param {k}")
    print(f"rank {rank}: INN DDP, widths {widths[rank]} ok", flush=True)


SUITES = {"operators": suite_operators, "grids": suite_grids, "errors": suite_errors,
          "kernels": suite_kernels, "ddp": suite_ddp}


def main() -> int:
    rank, world, init, suite = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        for name in suite.split(","):
            SUITES[name](rank, world)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
