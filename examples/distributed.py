"""Integrals over data split across processes, with torch.distributed (gloo on CPUs).

    torchrun --nproc_per_node=2 examples/distributed.py   # the usual launcher
    python examples/distributed.py                        # the same: starts 2 processes itself

Each rank holds its own output points and a contiguous slice of the data points Y; the
sharded operator returns, at the rank's points, the integral over the whole of Y, and the
gradients are those of the sum of the ranks' losses. Rank 0 checks everything against one
process computing on all the data.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import itdsl
from itdsl import distributed as itdist

HERE = Path(__file__).parent


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    gauss = itdsl.compile_file(HERE / "gauss.it")["gauss_smooth"]  # params alike on every rank

    # the whole data set, made alike on every rank here only to check the result at the end
    g = torch.Generator().manual_seed(0)
    X, Y, b = torch.rand(3000, 3, generator=g), torch.rand(5000, 3, generator=g), \
        torch.randn(5000, 16, generator=g)
    # this rank's pieces: uneven slices of X (its outputs) and of Y (the data), in rank order
    xs = torch.tensor_split(torch.arange(len(X)), world)[rank]
    ys = torch.tensor_split(torch.arange(len(Y))[: len(Y) - 7], world)[rank]  # (uneven)
    if rank == world - 1:
        ys = torch.arange(ys[0], len(Y))
    x_r, y_r, b_r = X[xs], Y[ys].clone().requires_grad_(), b[ys].clone().requires_grad_()

    # 1. The integral over Y, sharded over Y: a Gaussian kernel sum
    sop = itdist.shard(gauss, over="Y")
    u_r = sop(X=x_r, Y=y_r, b=b_r)                      # [|x_r|, 16]: over the whole of Y
    loss = u_r.square().sum()                           # the total loss: the sum over ranks
    loss.backward()                                     # b_r.grad: from every rank's outputs
    itdist.all_reduce_grads(sop)                        # gauss.s.grad: the total's gradient

    # one process on all of it, to compare
    ref = itdsl.compile_file(HERE / "gauss.it")["gauss_smooth"]
    Yf, bf = Y.clone().requires_grad_(), b.clone().requires_grad_()
    u = ref(X=X, Y=Yf, b=bf)
    u.square().sum().backward()

    def rel(a, ref):  # float32 sums of thousands of terms: compare relative to the scale
        return (a - ref).abs().max() / ref.abs().max()

    diffs = {"u": rel(u_r, u[xs]), "grad b": rel(b_r.grad, bf.grad[ys]),
             "grad Y": rel(y_r.grad, Yf.grad[ys]), "grad s": rel(gauss.s.grad, ref.s.grad)}

    # 2. Sharding only the output points (rows) needs no communication: each rank passes
    #    its rows and the whole of Y to the plain operator
    rows = gauss(X=x_r, Y=Y, b=b)
    diffs["rows"] = rel(rows, u[xs])

    # 3. Softmax attention over keys split across ranks: the normalised ratio is exact
    attn = itdsl.compile_file(HERE / "attention.it")["attention"]
    q, k, v = (torch.randn(4, 512, 64, generator=g) for _ in range(3))
    ks = torch.tensor_split(torch.arange(512), world)[rank]
    o_r = itdist.shard(attn, over="J")(q=q, k=k[:, ks], v=v[:, ks])  # every rank: all queries
    diffs["attention"] = rel(o_r, attn(q=q, k=k, v=v))

    worst = torch.stack(list(diffs.values()))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"{world} ranks; X {list(X.shape)} and Y {list(Y.shape)} split unevenly")
        for (name, _), d in zip(diffs.items(), worst.tolist()):
            print(f"  max |sharded - one process| / max |one process|, {name:<9}: {d:.1e}")
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    main()


if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun
        main()
    else:
        import socket

        import torch.multiprocessing as mp
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
        mp.spawn(_spawned, args=(world, port), nprocs=world)
