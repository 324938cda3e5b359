"""The transport solvers on their own: plans are doubly stochastic (P = n*T), optimal or near it."""

import pytest
import torch

from deus_dist.ot.solvers import pairwise_sq_dist, transport_plan


def costs(n=300, f=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, f, generator=g)
    perm = torch.randperm(n, generator=g)
    planted = pairwise_sq_dist(a, a[perm] + 0.05 * torch.randn(n, f, generator=g))
    random = pairwise_sq_dist(a, torch.randn(n, f, generator=g))
    return planted, random, perm


@pytest.mark.parametrize("solver", ["knn", "exact", "sinkhorn", "emd"])
def test_plans_are_doubly_stochastic_and_find_planted_permutations(solver):
    planted, _, perm = costs()
    plan, info = transport_plan(planted, solver, reg=0.002, knn=8)
    torch.testing.assert_close(plan.sum(1), torch.ones(300), atol=2e-3, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.ones(300), atol=2e-3, rtol=0)
    assert torch.equal(plan.argmax(1), torch.argsort(perm))
    assert info.sharpness > 0.95 and info.solver == solver


def test_knn_is_near_optimal_on_unrelated_units():
    _, random, _ = costs()
    exact, _ = transport_plan(random, "exact")
    knn, info = transport_plan(random, "knn", knn=16)
    assert info.sharpness == 1.0  # a permutation
    best, got = (exact * random).sum(), (knn * random).sum()
    assert best <= got <= best * 1.002


def test_sinkhorn_with_large_reg_is_soft():
    _, random, _ = costs()
    _, info = transport_plan(random, "sinkhorn", reg=10.0)
    assert info.sharpness < 0.1
