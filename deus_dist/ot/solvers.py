"""Transport plans between the units of two layers.

Every solver returns P = n * T for uniform marginals: rows (and columns) sum to 1, and in the exact
case P is a permutation matrix. ``P[i, j]`` is how much of layer A's unit i goes to layer B's
unit j, so A aligned to B's order is ``P.T @ A_rows``.

- ``exact``: the assignment problem (SciPy's Jonker-Volgenant ``linear_sum_assignment``), the
  optimum of the uniform-marginal OT problem, which always has a permutation solution.
- ``knn``: the same assignment restricted to a candidate graph, each unit's ``knn`` nearest units
  both ways (SciPy's sparse ``min_weight_full_bipartite_matching``); a permutation, optimal on the
  graph. Measured at n=8192 with 2048-dim random features: 1.9 s against 29 s for ``exact``, total
  cost within 0.003% of the optimum; planted permutations are found exactly. But with 6144-dim
  features (the Llama-1B MLP) the costs crowd within 2% of their mean and the sparse solver ran
  for minutes without finishing, so it is not the default. If the graph has no perfect matching,
  ``knn`` doubles until it does (at n <= 2*knn: ``exact``).
- ``sinkhorn``: entropic OT in the log domain (stable for any regulariser), on the cost's device
  (a GPU when ``--device cuda``); ``reg`` is relative to the mean cost.
- ``emd``: POT's network simplex, with its iteration cap raised and its convergence checked
  (POT only warns when it stops early).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

SOLVERS = ("exact", "knn", "sinkhorn", "emd")


@dataclass
class PlanInfo:
    solver: str
    seconds: float
    iterations: int = 0
    sharpness: float = 1.0
    """Mean over rows of each row's largest entry of P (1 for a permutation, 1/n for uniform)."""


def _exact(cost: torch.Tensor) -> tuple[torch.Tensor, int]:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().to("cpu", torch.float64).numpy())
    plan = torch.zeros(cost.shape, dtype=torch.float32)
    plan[torch.from_numpy(rows), torch.from_numpy(cols)] = 1.0
    return plan.to(cost.device), 0


def _knn(cost: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n = cost.shape[0]
    c = cost.detach().to("cpu", torch.float32)
    lo = c.min()
    spread = float(c.max() - lo) or 1.0
    while 2 * k < n:
        row_best = torch.topk(c, k, dim=1, largest=False).indices  # [n, k]
        col_best = torch.topk(c, k, dim=0, largest=False).indices  # [k, n]
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask.scatter_(1, row_best, True)
        mask.scatter_(0, col_best, True)
        rows, cols = mask.nonzero(as_tuple=True)
        # weights must be positive (an explicit 0 is no edge): shift by the minimum
        weights = ((c[rows, cols] - lo).double() + spread * 1e-9).numpy()
        graph = csr_matrix((weights, (rows.numpy(), cols.numpy())), shape=(n, n))
        try:
            r, col = min_weight_full_bipartite_matching(graph)
        except ValueError:  # no perfect matching inside the candidate graph: widen it
            k *= 2
            continue
        plan = torch.zeros(n, n, dtype=torch.float32)
        plan[torch.from_numpy(r), torch.from_numpy(col)] = 1.0
        return plan.to(cost.device), k
    return _exact(cost)


def _sinkhorn(cost: torch.Tensor, reg: float, max_iter: int, tol: float) -> tuple[torch.Tensor, int]:
    n = cost.shape[0]
    c = cost.to(torch.float64)
    eps = reg * c.abs().mean().clamp_min(1e-30)
    log_a = torch.full((n,), -np.log(n), dtype=c.dtype, device=c.device)
    f = torch.zeros(n, dtype=c.dtype, device=c.device)
    g = torch.zeros(n, dtype=c.dtype, device=c.device)
    it = 0
    for it in range(1, max_iter + 1):
        f = eps * (log_a - torch.logsumexp((g[None, :] - c) / eps, dim=1))
        g = eps * (log_a - torch.logsumexp((f[:, None] - c) / eps, dim=0))
        if it % 10 == 0 or it == max_iter:
            log_t = (f[:, None] + g[None, :] - c) / eps
            row_err = (torch.logsumexp(log_t, dim=1).exp() * n - 1).abs().max().item()
            if row_err < tol:
                break
    plan = torch.exp((f[:, None] + g[None, :] - c) / eps) * n
    return plan.to(torch.float32), it


def _emd(cost: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, int]:
    import ot

    n = cost.shape[0]
    m = cost.detach().to("cpu", torch.float64).numpy()
    a = np.full(n, 1.0 / n)
    iters = max(max_iter, 100_000, 50 * n * n)
    plan, log = ot.emd(a, a, m, numItermax=iters, log=True)
    if log.get("result_code") != 1:
        raise RuntimeError(
            f"ot.emd stopped before the optimum ({log.get('warning')}); raise --ot_max_iter or use "
            "--ot_solver exact"
        )
    return torch.from_numpy(plan * n).to(cost.device, torch.float32), iters


def transport_plan(
    cost: torch.Tensor,
    solver: str = "exact",
    reg: float = 0.01,
    max_iter: int = 2000,
    tol: float = 1e-4,
    knn: int = 128,
) -> tuple[torch.Tensor, PlanInfo]:
    """P = n * T minimising <T, cost> with uniform marginals, and what it took."""
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be square, got {tuple(cost.shape)}")
    start = time.perf_counter()
    if solver == "exact":
        plan, iters = _exact(cost)
    elif solver == "knn":
        plan, iters = _knn(cost, knn)
    elif solver == "sinkhorn":
        plan, iters = _sinkhorn(cost, reg, max_iter, tol)
    elif solver == "emd":
        plan, iters = _emd(cost, max_iter)
    else:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if cost.is_cuda:
        torch.cuda.synchronize()
    info = PlanInfo(solver, time.perf_counter() - start, iters, plan.max(dim=1).values.mean().item())
    return plan, info


def pairwise_sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of x [n, f] and rows of y [n, f], clamped at 0."""
    x = x.to(torch.float32)
    y = y.to(torch.float32)
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return d.clamp_min_(0.0)
