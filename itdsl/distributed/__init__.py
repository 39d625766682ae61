"""Integrals over domains split across processes, with torch.distributed (itdsl.distributed).

    import torch.distributed as dist
    from itdsl import distributed as itdist
    dist.init_process_group("gloo")              # torchrun sets the rank and world size
    sop = itdist.shard(op, over="Y")             # op: an itdsl operator module
    u = sop(X=x_local, Y=y_local, b=b_local)     # the integral over the whole of Y, at x_local
    u.pow(2).sum().backward()                    # exact gradients of the sum of the ranks' losses
    itdist.all_reduce_grads(sop)                 # the params' gradients of that total (or DDP)

Each rank passes its own output points (its rows: a contiguous piece of X) and its contiguous
slice of the sharded domain Y, slices in rank order; what lives on Y (its coordinates, the
fields on it, a size given as an int) is exchanged per call, every other argument is the
rank's own. See `shard` for the semantics and the cost.
"""

from .shard import ShardedOperator, all_reduce_grads, shard

__all__ = ["shard", "ShardedOperator", "all_reduce_grads"]
