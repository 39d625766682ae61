"""`make fuzz`: the differential fuzzer's command line (the campaign is in campaign.py).

    PYTHONPATH=tests .venv/bin/python -m fuzzing --n 10000 --tvm 500 --seed 0 --jobs 2
    PYTHONPATH=tests .venv/bin/python -m fuzzing --replay tests/fuzz_corpus/new/seed-17.it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .campaign import campaign
from .corpus import CORPUS, replay


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzzing", description="the differential fuzzer")
    ap.add_argument("--n", type=int, default=10000, help="programs through the torch paths")
    ap.add_argument("--tvm", type=int, default=500, help="of them, through the TVM kernels")
    ap.add_argument("--seed", type=int, default=0, help="the first program's seed")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per torch program")
    ap.add_argument("--out", type=Path, default=CORPUS / "new", help="where failures go")
    ap.add_argument("--replay", nargs="+", type=Path, help="corpus files to rerun instead")
    args = ap.parse_args(argv)
    if args.replay:
        failing = 0
        for path in args.replay:
            report = replay(path)
            failing += bool(report.failures)
            print(f"{path}: strategy {report.strategy}, inputs {report.inputs}")
            for f in report.failures or ["ok: every path agrees"]:
                print(f"  {f}")
        return int(failing > 0)
    return int(campaign(args.n, args.tvm, args.seed, args.jobs, args.timeout, args.out) > 0)


if __name__ == "__main__":
    sys.exit(main())
