#!/usr/bin/env python
"""Time the OT solvers on neuron-matching costs, to choose defaults from measurements.

Two costs between an n x f feature matrix A and B (squared Euclidean, as opt-deus builds them):
  structured: B is A's rows permuted plus 10% noise (what trained adjacent layers look like at best);
  random:     B independent of A (the worst case; what a random-weight benchmark checkpoint gives).
For each, each solver's seconds, whether it found the planted permutation (structured), and the
transport cost relative to the exact optimum. Float32 vs float64 costs are compared for exact.

    python tools/bench_ot.py [--n 8192] [--features 2048] [--solvers exact,sinkhorn,emd]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deus_dist.ot.solvers import pairwise_sq_dist, transport_plan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--solvers", default="exact,sinkhorn")
    ap.add_argument("--reg", type=float, default=0.01)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(args.n, args.features, generator=g) * 0.02
    perm = torch.randperm(args.n, generator=g)
    costs = {
        "structured": pairwise_sq_dist(a, a[perm] + 0.1 * torch.randn(a.shape, generator=g) * 0.02),
        "random": pairwise_sq_dist(a, torch.randn(a.shape, generator=g) * 0.02),
    }
    print(f"n={args.n}, features={args.features}, device={args.device}, {os.cpu_count()} CPUs")
    print(
        f"{'cost':11s} {'solver':22s} {'seconds':>8s} {'found perm':>10s} {'cost/exact':>10s} {'sharpness':>9s}"
    )
    for name, cost in costs.items():
        best = None
        for solver in args.solvers.split(","):
            variants = [("float64", cost.double()), ("float32", cost)] if solver == "exact" else [("", cost)]
            for label, c in variants:
                start = time.perf_counter()
                plan, info = transport_plan(c.to(args.device), solver, reg=args.reg)
                secs = time.perf_counter() - start
                total = float((plan.cpu().double() * cost.double()).sum())
                best = total if best is None else best
                found = (
                    bool((plan.cpu().argmax(1) == torch.argsort(perm)).all())
                    if name == "structured"
                    else None
                )
                tag = f"{solver} {label}".strip() + (f" reg={args.reg}" if solver == "sinkhorn" else "")
                print(
                    f"{name:11s} {tag:22s} {secs:8.2f} {str(found) if found is not None else '-':>10s} "
                    f"{total / best:10.4f} {info.sharpness:9.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
