#!/usr/bin/env python
"""Time the assignment solvers against the cost product they solve, at real model shapes.

For each shape n x f (n units with f features: an MLP pair has n = intermediate size, f = 3 x
hidden size, from its gate row, up row and down column), in one run on one device:
  - the cost: squared distances between two random n x f feature matrices, built as opt-deus
    builds it (one GEMM in row blocks), with its time and GFLOP/s;
  - random (crowded) costs: B independent of A, so every cost is within a few % of the mean and
    the optimum is only 3-5% better than the identity (what random-weight benchmark checkpoints
    give, and the hard case for a solver);
  - auction: seconds, bidding rounds, its certified share of the optimum's improvement over the
    identity, and its time as a multiple of the cost product's;
  - exact (SciPy), up to --exact_max units: seconds, and the auction's measured share
    (cost(identity) - cost(auction)) / (cost(identity) - cost(exact)), the quality bar (>= 0.99);
  - planted: B = A's rows permuted plus 10% noise; whether the auction finds the permutation.

    python tools/bench_ot.py [--shapes 8192x6144,14336x12288,28672x24576] [--exact_max 8192]
        [--device cpu|cuda] [--tol 0.002]

The shapes: Llama-3.2-1B (8192 x 6144), Llama-3.1-8B (14336 x 12288), Llama-3.1-70B (28672 x
24576; its cost alone is 40 TFLOP, minutes on a CPU).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from deus_dist.ot.solvers import plan_cost, sq_dist_from_parts, transport_plan


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x6144,14336x12288,28672x24576")
    ap.add_argument("--exact_max", type=int, default=8192, help="run SciPy's exact solver up to this n")
    ap.add_argument("--planted_max", type=int, default=14336, help="run the planted check up to this n")
    ap.add_argument("--tol", type=float, default=0.002, help="the auction's --ot_tol")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = args.device
    print(f"device {dev}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, auction tol {args.tol}")
    header = (
        f"{'n x f':>13s} {'cost s':>7s} {'GFLOP/s':>8s} {'auction s':>9s} {'/cost':>6s} {'rounds':>7s} "
        f"{'certified':>9s} {'exact s':>8s} {'share':>9s} {'planted':>8s}"
    )
    rows = []
    for shape in args.shapes.split(","):
        n, f = (int(x) for x in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        a = (torch.randn(n, f, generator=g) * 0.02).to(dev)
        b = (torch.randn(n, f, generator=g) * 0.02).to(dev)
        sync(dev)
        start = time.perf_counter()
        cost = sq_dist_from_parts([a], [b])
        sync(dev)
        cost_s = time.perf_counter() - start
        gflops = 2 * n * n * f / cost_s / 1e9
        del b
        plan, info = transport_plan(cost, "auction", gap_tol=args.tol)
        exact_s = share = None
        if n <= args.exact_max:
            exact, exact_info = transport_plan(cost.cpu(), "exact")
            exact_s = exact_info.seconds
            identity = float(cost.diagonal().double().sum())
            share = (identity - plan_cost(cost, plan)) / (identity - plan_cost(cost.cpu(), exact))
            del exact
        del cost, plan
        planted = None
        if n <= args.planted_max:
            perm = torch.randperm(n, generator=g).to(dev)
            noisy = a[perm] + 0.1 * 0.02 * torch.randn(n, f, generator=g).to(dev)
            cost = sq_dist_from_parts([a], [noisy])
            del noisy
            p, _ = transport_plan(cost, "auction", gap_tol=args.tol)
            planted = bool(torch.equal(perm[p], torch.arange(n, device=dev)))
            del cost, p
        del a
        row = (
            f"{shape:>13s} {cost_s:7.1f} {gflops:8.0f} {info.seconds:9.1f} {info.seconds / cost_s:6.2f} "
            f"{info.iterations:7d} {info.certified:9.4f} "
            f"{'-' if exact_s is None else format(exact_s, '8.1f'):>8s} "
            f"{'-' if share is None else format(share, '9.5f'):>9s} "
            f"{'-' if planted is None else str(planted):>8s}"
        )
        rows.append(row)
        print(header if len(rows) == 1 else "", row, sep="\n" if len(rows) == 1 else "", flush=True)
    print("\nshare: the auction's share of the exact optimum's improvement over the identity (bar: 0.99)")
    print("certified: the share the auction proves from its duality gap, without knowing the optimum")


if __name__ == "__main__":
    main()
