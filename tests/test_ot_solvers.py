"""The transport solvers on their own: plans are doubly stochastic (P = n*T), optimal or provably
near it."""

import pytest
import torch

from deus_dist.ot.solvers import dense, pairwise_sq_dist, plan_cost, sq_dist_from_parts, transport_plan


def costs(n=300, f=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, f, generator=g)
    perm = torch.randperm(n, generator=g)
    planted = pairwise_sq_dist(a, a[perm] + 0.05 * torch.randn(n, f, generator=g))
    random = pairwise_sq_dist(a, torch.randn(n, f, generator=g))
    return planted, random, perm


def share_of_optimum(cost, plan, optimum):
    """(cost(identity) - cost(P)) / (cost(identity) - cost(P*)): the quality bar's measure."""
    identity = float(cost.diagonal().double().sum())
    return (identity - plan_cost(cost, plan)) / (identity - plan_cost(cost, optimum))


@pytest.mark.parametrize("solver", ["auction", "exact", "sinkhorn", "emd"])
def test_plans_are_doubly_stochastic_and_find_planted_permutations(solver):
    planted, _, perm = costs()
    plan, info = transport_plan(planted, solver, reg=0.002)
    p = dense(plan)
    torch.testing.assert_close(p.sum(1), torch.ones(300), atol=2e-3, rtol=0)
    torch.testing.assert_close(p.sum(0), torch.ones(300), atol=2e-3, rtol=0)
    assert torch.equal(p.argmax(1), torch.argsort(perm))
    assert info.sharpness > 0.95 and info.solver == solver
    assert (plan.ndim == 1) == (solver != "sinkhorn")  # permutation solvers return the permutation


@pytest.mark.parametrize("n,features,seed", [(300, 64, 0), (2048, 1024, 1), (2048, 1024, 2)])
def test_auction_keeps_the_certified_share_of_the_optimum_on_crowded_costs(n, features, seed):
    # Independent random units in many dimensions: costs crowd within a few % of their mean, the
    # hard case (an optimum only 3-5% better than the identity, many near-ties).
    _, random, _ = costs(n, features, seed)
    optimum, _ = transport_plan(random, "exact")
    plan, info = transport_plan(random, "auction", gap_tol=2e-3)
    assert torch.equal(torch.sort(plan).values, torch.arange(n))  # a permutation
    share = share_of_optimum(random, plan, optimum)
    # The certificate is a true lower bound, and it meets the tolerance asked for.
    assert info.certified >= 1 - 2e-3
    assert share >= info.certified - 1e-9
    assert share >= 0.99


def test_auction_reaches_the_optimum_with_a_tight_tolerance():
    _, random, _ = costs(400, 128, 3)
    optimum, _ = transport_plan(random, "exact")
    plan, info = transport_plan(random, "auction", gap_tol=1e-7)
    assert (
        torch.equal(plan, optimum) and info.certified > 1 - 1e-5
    )  # float32 prices: eps >= 1e-6 of the range


def test_auction_on_degenerate_costs():
    one, _ = transport_plan(torch.zeros(1, 1), "auction")
    assert one.tolist() == [0]
    flat, info = transport_plan(torch.full((5, 5), 3.0), "auction")  # every permutation is optimal
    assert sorted(flat.tolist()) == list(range(5)) and info.certified == 1.0
    two, _ = transport_plan(torch.tensor([[5.0, 1.0], [1.0, 5.0]]), "auction")
    assert two.tolist() == [1, 0]


def test_cost_from_parts_equals_the_cost_of_concatenated_features():
    g = torch.Generator().manual_seed(0)
    xa = [torch.randn(70, 5, generator=g), torch.randn(9, 70, generator=g).T]  # a column view
    xb = [torch.randn(70, 5, generator=g), torch.randn(9, 70, generator=g).T]
    whole = pairwise_sq_dist(torch.cat(xa, 1), torch.cat(xb, 1))
    torch.testing.assert_close(sq_dist_from_parts(xa, xb, block_rows=16), whole)
    torch.testing.assert_close(
        whole, torch.cdist(torch.cat(xa, 1), torch.cat(xb, 1)) ** 2, atol=1e-3, rtol=1e-4
    )


def test_sinkhorn_with_large_reg_is_soft():
    _, random, _ = costs()
    plan, info = transport_plan(random, "sinkhorn", reg=10.0)
    assert info.sharpness < 0.1 and info.certified is None and plan.ndim == 2
