"""Aligning the routed experts of two mixture-of-experts blocks.

Two spaces (see ``deus_dist/architectures/mixtral.json``):
- ``experts``: the units are routed experts. An expert carries every tensor expanded from an
  ``{expert}`` key of the description and its router row (the rows of the tensors whose rows live
  in ``experts``), so moving an expert moves both and the router still selects the same weights;
- ``expert_mlp``: the intermediate neurons of one expert (rows of its gate and up, columns of its
  down), one transport per matched pair of experts, as for a dense MLP.

Both orders are arbitrary: which slot an expert sits in, and the neuron order inside it. A cost on
raw weights would compare unrelated neurons, so the cost of pairing expert a of A with expert b
of B (``cost``) is their squared distance after a's neurons are transported onto b's (the neuron
plan of that pair), plus the squared distance of their router rows (``weights+router``, the
default; ``weights`` leaves the rows out). That needs E^2 neuron plans per block. ``router``
compares the router rows alone (they read the residual stream, which no layer permutes): E
neuron plans, one per matched pair. Experts are then matched by an exact assignment whatever the neuron solver: E is
small, and a soft mixture of experts is not an expert the router can select. A's expert moved to
slot j takes the neuron plan of its pair with B's expert j.
"""

from __future__ import annotations

import time

import torch

from deus_dist.architectures import Architecture
from deus_dist.ot.align import SolverSettings, SpaceReport, _report, apply_plan, unit_feature_parts
from deus_dist.ot.solvers import plan_cost, sq_dist_from_parts, sq_norms, transport_plan

EXPERTS = "experts"
EXPERT_MLP = "expert_mlp"
COSTS = ("weights+router", "weights", "router")
EXACT_UP_TO = 4096
"""Experts of at most this many neurons get SciPy's exact assignment where the solver is the
auction: at these sizes it is both optimal and faster (measured here, 2 shared CPUs, random
0.02-scale weights: n = 768 exact 0.05 s vs auction 2.7 s; n = 3072 5.3 s vs 15.8 s). Routed
experts are small (Qwen3-MoE 768, OLMoE 1024, Qwen2-MoE 1408); Mixtral's 14336 keep the auction."""


def expert_units(arch: Architecture, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int]:
    """(experts, neurons per expert, residual width) of a block, from its tensors' shapes."""
    experts = arch.experts()
    suffix = next(s for s in experts[0].values() if arch.block[s].rows == EXPERT_MLP)
    neurons, width = shapes[suffix][:2]
    return len(experts), neurons, width


def _expert_parts(block: dict[str, torch.Tensor], arch: Architecture, suffixes: dict[str, str], units: int):
    sub = {s: block[s] for s in suffixes.values() if s in block}
    return unit_feature_parts(sub, arch, EXPERT_MLP, units)


def _router_parts(block: dict[str, torch.Tensor], arch: Architecture, experts: int) -> list[torch.Tensor]:
    routers = {s: t for s, t in block.items() if arch.block[s].rows == EXPERTS}
    return unit_feature_parts(routers, arch, EXPERTS, experts) if routers else []


def align_experts(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    arch: Architecture,
    solver: SolverSettings,
    cost: str = "weights+router",
) -> tuple[dict[str, torch.Tensor], dict[str, SpaceReport]]:
    """A with its experts (and their router rows) moved to B's order and each expert's neurons to
    its partner's, and reports for ``experts`` and ``expert_mlp``; ``cost`` is one of ``COSTS``."""
    if cost not in COSTS:
        raise ValueError(f"unknown expert cost {cost!r}; choose one of {COSTS}")
    experts = arch.experts()
    E = len(experts)
    n = next(a[s].shape[0] for s in experts[0].values() if arch.block[s].rows == EXPERT_MLP)
    if solver.solver == "auction" and n <= EXACT_UP_TO:
        solver = SolverSettings("exact", solver.reg, solver.max_iter, solver.gap_tol)
    start = time.perf_counter()
    parts_a = [_expert_parts(a, arch, experts[e], n) for e in range(E)]
    parts_b = [_expert_parts(b, arch, experts[e], n) for e in range(E)]
    norms_a = [sq_norms(p) for p in parts_a]
    norms_b = [sq_norms(p) for p in parts_b]
    device = norms_a[0].device
    pair_cost = torch.zeros(E, E, dtype=torch.float64, device=device)
    total_a = torch.zeros(E, dtype=torch.float64, device=device)
    total_b = torch.zeros(E, dtype=torch.float64, device=device)
    kept: dict[tuple[int, int], tuple] = {}
    neuron_seconds = 0.0
    solved = 0
    if cost != "router":
        for i in range(E):
            for j in range(E):
                c = sq_dist_from_parts(parts_a[i], parts_b[j], norms=(norms_a[i], norms_b[j]))
                plan, info = solver.plan(c)
                neuron_seconds += info.seconds
                solved += 1
                pair_cost[i, j] = plan_cost(c, plan)
                if plan.ndim == 1:  # a permutation costs n integers to keep; a soft plan is recomputed
                    kept[i, j] = (plan, info)
        total_a += torch.stack([x.sum() for x in norms_a]).double()
        total_b += torch.stack([x.sum() for x in norms_b]).double()
    if cost != "weights":
        ra, rb = _router_parts(a, arch, E), _router_parts(b, arch, E)
        if not ra:
            raise ValueError(f"the {arch.family} block has no tensor in space {EXPERTS!r} (a router)")
        pair_cost += sq_dist_from_parts(ra, rb).double()
        total_a += sq_norms(ra).double()
        total_b += sq_norms(rb).double()
    expert_plan, expert_info = transport_plan(pair_cost, "exact")
    cost_seconds = time.perf_counter() - start - neuron_seconds

    aligned = dict(a)
    src = torch.argsort(expert_plan).tolist()  # A's expert src[j] goes to slot j
    pair_reports = []
    for j, i in enumerate(src):
        c = sq_dist_from_parts(parts_a[i], parts_b[j], norms=(norms_a[i], norms_b[j]))
        if (i, j) in kept:
            plan, info = kept[i, j]
        else:
            plan, info = solver.plan(c)
            neuron_seconds += info.seconds
            solved += 1
        pair_reports.append(_report(plan, info, c, norms_a[i], norms_b[j], info.seconds))
        moved = {s: a[s] for s in experts[i].values() if s in a}
        apply_plan(moved, arch, EXPERT_MLP, plan)
        for template, suffix in experts[i].items():
            if suffix in moved:
                aligned[experts[j][template]] = moved[suffix]
    apply_plan(aligned, arch, EXPERTS, expert_plan)  # the router rows follow their experts

    expert_report = _report(expert_plan, expert_info, pair_cost, total_a, total_b, expert_info.seconds)
    expert_report.cost_seconds = cost_seconds
    expert_report.extra = {"cost": cost}
    certified = [r.certified for r in pair_reports]
    neuron_report = SpaceReport(
        solver=pair_reports[0].solver,
        units=n,
        seconds=neuron_seconds,
        matched_similarity=sum(r.matched_similarity for r in pair_reports) / E,
        identity_similarity=sum(r.identity_similarity for r in pair_reports) / E,
        sharpness=sum(r.sharpness for r in pair_reports) / E,
        certified=None if None in certified else min(certified),
        extra={"pairs": E, "plans_solved": solved},
    )
    return aligned, {EXPERTS: expert_report, EXPERT_MLP: neuron_report}
