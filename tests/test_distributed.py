"""itdsl.distributed: sharded integrals and DDP with the gloo backend, 2 and 3 processes on
this machine (tests/dist_worker.py is one rank; every rank checks its part against the
one-process result to 1e-10 in float64). A broken rank fails the test by its timeout instead
of hanging it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import itdsl
from itdsl import distributed as itdist
from itdsl.errors import InputError, UnsupportedError

WORKER = Path(__file__).parent / "dist_worker.py"
TIMEOUT = 300  # seconds for every rank of one launch


def launch(world: int, suites: str, tmp_path: Path) -> list[str]:
    """Run `world` ranks of the worker; the output of each (or the failure of any)."""
    init = tmp_path / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(init),
                               suites], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank did not finish within {TIMEOUT} s (a hang in a collective?):\n"
                    + "\n".join(p.communicate()[0][-3000:] for p in procs))
    failed = [(r, o) for r, (p, o) in enumerate(zip(procs, outs)) if p.returncode]
    assert not failed, "\n".join(f"rank {r}:\n{o[-4000:]}" for r, o in failed)
    return outs


@pytest.mark.parametrize("world,suites", [
    (2, "operators,ddp"),
    (3, "operators,grids,errors,kernels"),
])
def test_sharded_calls_equal_one_process(world, suites, tmp_path):
    outs = launch(world, suites, tmp_path)
    for r, out in enumerate(outs):
        assert f"rank {r}: g_sum (all-gather) ok" in out or f"rank {r}: DDP eager ok" in out, out


PROGRAM = """
operator self_attention {
    domain T = index
    input  q : T -> R^4
    input  v : T -> R^2
    output o(t: T) = integral(s: T) exp(dot(q(t), q(s))) * v(s) * [s <= t]
}
operator gauss {
    domain X = points(2)
    domain Y = points(2)
    domain L = index(2)
    input  b : Y -> R^3
    output u(x: X) = integral(y: Y) exp(-sqnorm(x - y)) * b(y)
}
operator blur {
    domain P = index
    domain S = stencil(3)
    input  f : P -> R
    output u(p: P) = integral(s: S) f(p + s)
}
operator nodes {
    domain X = points(1)
    domain G = grid(0, 1)
    output u(x: X) = integral(g: G) sin(x[0] * g) with gauss(4)
}
operator lattice {
    domain P = index(2)
    domain X = points(1)
    input  f : P -> R
    output u(x: X) = integral(p: P) f(p) * x[0]
}
"""


def test_refusals_name_the_domain_and_say_what_to_do():
    prog = itdsl.compile_source(PROGRAM, target="reference")
    with pytest.raises(UnsupportedError, match="(?s)ranges over `T`.*domain of their own"):
        itdist.shard(prog["self_attention"], over="T")
    with pytest.raises(InputError, match="no domain `Z`"):
        itdist.shard(prog["gauss"], over="Z")
    with pytest.raises(InputError, match="no integral of `gauss` ranges over `L`"):
        itdist.shard(prog["gauss"], over="L")
    with pytest.raises(UnsupportedError, match="stencil"):
        itdist.shard(prog["blur"], over="S")
    with pytest.raises(UnsupportedError, match="2 axes"):
        itdist.shard(prog["lattice"], over="P")
    with pytest.raises(UnsupportedError, match="gauss.*nodes are its own"):
        itdist.shard(prog["nodes"], over="G")
    with pytest.raises(UnsupportedError, match="(?s)output.s domain `I` is a index.*points\\(1\\)"):
        itdist.shard(itdsl.compile_source(CAUSAL, target="reference")["causal"], over="J")
    with pytest.raises(InputError, match="sharded over `Y` already"):
        itdist.shard(itdist.shard(prog["gauss"], over="Y"), over="Y")
    with pytest.raises(InputError, match="operator module"):
        itdist.shard(torch.nn.Linear(2, 2), over="Y")


def test_the_ring_is_chosen_where_blocks_add_up_and_refused_with_the_reason_elsewhere():
    prog = itdsl.compile_source(PROGRAM + RATIO, target="reference")
    assert itdist.shard(prog["gauss"], over="Y").ring
    assert not itdist.shard(prog["gauss"], over="Y", ring=False).ring
    assert not itdist.shard(prog["ratio"], over="Y").ring  # the all-gather instead
    with pytest.raises(UnsupportedError, match="(?s)not a single integral.*gathers"):
        itdist.shard(prog["ratio"], over="Y", ring=True)
    with pytest.raises(UnsupportedError, match="positions depend on the slices"):
        itdist.shard(prog["keys"], over="J", ring=True)


CAUSAL = """
operator causal {
    domain I = index
    domain J = index
    input  q : I -> R^4
    input  k : J -> R^4
    output o(i: I) = integral(j: J) exp(dot(q(i), k(j))) * [j <= i]
}
"""

RATIO = """
operator ratio {
    domain X = points(2)
    domain Y = points(2)
    input  b : Y -> R^3
    output u(x: X) = integral(y: Y) exp(-sqnorm(x - y)) * b(y) / integral(y: Y) exp(-sqnorm(x - y))
}
operator keys {
    domain I = index
    domain J = index
    input  v : J -> R
    output u(i: I) = integral(j: J) v(j)
}
"""


def test_a_call_without_a_process_group_says_how_to_start_one():
    sop = itdist.shard(itdsl.compile_source(PROGRAM, target="reference")["gauss"], over="Y")
    with pytest.raises(InputError, match="init_process_group"):
        sop(X=torch.rand(3, 2), Y=torch.rand(4, 2), b=torch.rand(4, 3))
