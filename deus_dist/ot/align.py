"""Aligning layer A's units to layer B's, space by space, as the architecture description says.

Spaces of a block (see ``deus_dist/architectures/llama.json``):
- ``residual``: shared by all layers, never permuted;
- ``mlp``: one transport over the intermediate neurons, shared by the tensors whose rows (gate,
  up) or columns (down) live there, since SwiGLU pairs gate and up;
- ``kv_heads`` / ``q_heads``: one transport over KV groups (a kv head with its H/Hkv query heads)
  and, inside each matched pair of groups, one over the query heads. Whole heads move; dimensions
  inside a head never do (RoPE pairs them);
- ``head_dim``: q_norm/k_norm act on a head's dimensions and move with nothing;
- ``experts`` / ``expert_mlp``: routed experts of a mixture-of-experts block and the neurons
  inside each (see :mod:`deus_dist.ot.experts`). A block may have no dense ``mlp`` space, or use
  it for a shared expert (a dense MLP beside the routed ones).

A unit's features are its rows (for tensors whose rows live in the space) and columns (for tensors
whose columns do), concatenated; the same extraction serves weights and activations (for
activations, a tensor's "rows" are the module's outputs over calibration tokens, [out, T], and its
"columns" the module's inputs, [T, in]).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from deus_dist.architectures import Architecture
from deus_dist.ot.solvers import (
    ROW_BLOCK,
    PlanInfo,
    dense,
    pairwise_sq_dist,
    sq_dist_from_parts,
    sq_norms,
    transport_plan,
)


@dataclass(frozen=True)
class HeadGeometry:
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict, arch: Architecture | None = None) -> HeadGeometry:
        """From config.json; ``arch`` maps the standard field names to the family's own."""

        def get(name):
            return config.get(arch.config_key(name) if arch is not None else name)

        heads = get("num_attention_heads")
        kv = get("num_key_value_heads") or heads
        hd = get("head_dim") or get("hidden_size") // heads
        return cls(heads, kv, hd)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class SolverSettings:
    solver: str = "auction"
    reg: float = 0.01
    max_iter: int = 2000
    gap_tol: float = 2e-3

    def plan(self, cost: torch.Tensor) -> tuple[torch.Tensor, PlanInfo]:
        return transport_plan(cost, self.solver, self.reg, self.max_iter, gap_tol=self.gap_tol)


@dataclass
class SpaceReport:
    """Diagnostics of one space of one fused pair."""

    solver: str
    units: int
    seconds: float
    matched_similarity: float
    """Mean cosine similarity of A's units to the B units they are transported to."""
    identity_similarity: float
    """The same in the original (unmatched) order."""
    sharpness: float
    cost_seconds: float = 0.0
    """Building the cost matrix (the GEMM the solver's ``seconds`` are compared with)."""
    certified: float | None = 1.0
    """Lower bound on the share of the optimum's improvement over the identity order reached
    (see :class:`deus_dist.ot.solvers.PlanInfo`)."""
    extra: dict = field(default_factory=dict)


def _math(t: torch.Tensor, role, stored: bool) -> torch.Tensor:
    """A stored tensor as [out, in] (a view): GPT-2's Conv1D weights are stored [in, out]."""
    return t.T if stored and role.transposed and t.ndim == 2 else t


def row_blocks(role, rows: int, units: dict[str, int] | None) -> list[tuple[str, int, int]]:
    """(space, start, stop) of each block of a tensor's rows: one block unless the tensor is
    fused, whose blocks all have the same rows per unit (q heads | kv groups | kv groups)."""
    spaces = role.row_spaces
    if len(spaces) == 1:
        return [(spaces[0], 0, rows)]
    if units is None or any(sp not in units for sp in spaces):
        raise ValueError(f"a fused tensor over {spaces} needs the unit count of each of its spaces")
    per_unit, rest = divmod(rows, sum(units[sp] for sp in spaces))
    if rest:
        raise ValueError(f"{rows} fused rows do not split into {spaces} of {units}")
    out, start = [], 0
    for sp in spaces:
        stop = start + units[sp] * per_unit
        out.append((sp, start, stop))
        start = stop
    return out


def space_size(arch: Architecture, shapes: dict[str, tuple[int, ...]], space: str) -> tuple[int, int] | None:
    """(units, features per unit of one tensor) of a space whose units are single rows or
    columns (the MLP intermediate), read from a tensor holding it alone in one dimension."""
    for suffix, role in arch.block.items():
        shape = shapes.get(suffix)
        if shape is None or len(shape) != 2:
            continue
        out, inp = (shape[1], shape[0]) if role.transposed else (shape[0], shape[1])
        if role.cols == space:
            return inp, out
        if role.rows == space:
            return out, inp
    return None


def space_units(
    tensors: dict[str, torch.Tensor], arch: Architecture, geo: HeadGeometry | None
) -> dict[str, int]:
    """Units of every space of the block that the transport moves."""
    units = {}
    if geo is not None:
        units.update(q_heads=geo.heads, kv_heads=geo.kv_heads)
    mlp = space_size(arch, {s: tuple(t.shape) for s, t in tensors.items()}, "mlp")
    if mlp is not None:
        units["mlp"] = mlp[0]
    return units


def unit_feature_parts(
    tensors: dict[str, torch.Tensor],
    arch: Architecture,
    space: str,
    units: int,
    all_units: dict[str, int] | None = None,
    stored: bool = True,
) -> list[torch.Tensor]:
    """The [units, f] pieces (views where possible) whose concatenation is each unit's features:
    rows of every tensor (or block of a fused tensor) whose rows live in ``space``, columns of
    every tensor whose columns do. ``stored``: the tensors are weights as stored (Conv1D ones
    [in, out]); activation features are always [out, T] rows and [T, in] columns."""
    parts = []
    for suffix, role in arch.block.items():
        t = tensors.get(suffix)
        if t is None:
            continue
        t = _math(t, role, stored)
        if space in role.row_spaces:
            for sp, start, stop in row_blocks(role, t.shape[0], all_units):
                if sp == space:
                    parts.append(t[start:stop].reshape(units, -1))
        if role.cols == space:
            out = t.shape[0]
            parts.append(t.reshape(out, units, -1).permute(1, 0, 2).reshape(units, -1))
    if not parts:
        raise ValueError(f"no tensor of the {arch.family} block lives in space {space!r}")
    return [p.to(torch.float32) for p in parts]


def unit_features(
    tensors: dict[str, torch.Tensor],
    arch: Architecture,
    space: str,
    units: int,
    all_units: dict[str, int] | None = None,
    stored: bool = True,
) -> torch.Tensor:
    """[units, F] features of a space's units from every tensor whose rows or columns live there."""
    return torch.cat(unit_feature_parts(tensors, arch, space, units, all_units, stored), dim=1)


def source_index(plan: torch.Tensor) -> torch.Tensor | None:
    """``src`` with A's unit ``src[j]`` going to B's unit j if the plan is a permutation (a
    permutation vector, or a 0/1 matrix), else None."""
    if plan.ndim == 1:
        return torch.argsort(plan)
    src = plan.argmax(dim=0)
    ones = plan[src, torch.arange(plan.shape[1], device=plan.device)]
    if bool((ones == 1).all()) and float(plan.sum()) == plan.shape[0]:
        return src
    return None


def apply_plan(
    block: dict[str, torch.Tensor],
    arch: Architecture,
    space: str,
    plan: torch.Tensor,
    units: dict[str, int] | None = None,
) -> None:
    """In place: move A's units of ``space`` to B's order (rows: P^T @ A; columns: A @ P).

    A permutation is applied by indexing, which costs nothing next to the dense products a soft
    plan needs (as many flops as computing the cost itself). ``units`` (every space's unit
    count) locates the blocks of fused tensors.
    """
    n = plan.shape[0]
    src = source_index(plan)
    for suffix, role in arch.block.items():
        t = block.get(suffix)
        if t is None or (space not in role.row_spaces and role.cols != space):
            continue
        shape = t.shape
        t = _math(t, role, True)
        if space in role.row_spaces:
            pieces = []
            for sp, start, stop in row_blocks(role, t.shape[0], units):
                piece = t[start:stop]
                if sp == space:
                    rows = piece.reshape(n, -1)
                    piece = (rows[src] if src is not None else plan.T @ rows).reshape(piece.shape)
                pieces.append(piece)
            t = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if role.cols == space:
            cols = t.reshape(t.shape[0], n, -1)
            if src is not None:
                t = cols[:, src].reshape(t.shape)
            else:
                t = torch.einsum("oiu,ij->oju", cols, plan).reshape(t.shape)
        block[suffix] = _math(t, role, True).contiguous().reshape(shape)


def _report(
    plan: torch.Tensor, info: PlanInfo, cost: torch.Tensor, na: torch.Tensor, nb: torch.Tensor, seconds: float
) -> SpaceReport:
    """Similarities from squared distances and squared norms: cos = (|a|^2 + |b|^2 - d) / 2|a||b|,
    for the matched pairs and the identity pairs only (a soft plan weighs every pair, in row
    blocks), so no n x n temporary is made."""
    n = cost.shape[0]
    ar = torch.arange(n, device=cost.device)

    def cos(i, j):
        return (na[i] + nb[j] - cost[i, j]) / (2 * (na[i] * nb[j]).sqrt()).clamp_min(1e-30)

    if plan.ndim == 1:
        matched = float(cos(ar, plan).double().mean())
    else:
        total = 0.0
        for i in range(0, n, ROW_BLOCK):
            rows = ar[i : i + ROW_BLOCK]
            total += float((plan[rows].double() * cos(rows[:, None], ar[None, :]).double()).sum())
        matched = total / n
    return SpaceReport(
        solver=info.solver,
        units=n,
        seconds=seconds,
        matched_similarity=matched,
        identity_similarity=float(cos(ar, ar).double().mean()),
        sharpness=info.sharpness,
        certified=info.certified,
    )


def mlp_plan(
    parts_a: list[torch.Tensor], parts_b: list[torch.Tensor], solver: SolverSettings
) -> tuple[torch.Tensor, SpaceReport]:
    start = time.perf_counter()
    na, nb = sq_norms(parts_a), sq_norms(parts_b)
    cost = sq_dist_from_parts(parts_a, parts_b, norms=(na, nb))
    if cost.is_cuda:
        torch.cuda.synchronize()
    cost_seconds = time.perf_counter() - start
    plan, info = solver.plan(cost)
    report = _report(plan, info, cost, na, nb, info.seconds)
    report.cost_seconds = cost_seconds
    return plan, report


def head_plans(
    fa_kv: torch.Tensor,
    fb_kv: torch.Tensor,
    fa_q: torch.Tensor,
    fb_q: torch.Tensor,
    geo: HeadGeometry,
    solver: SolverSettings,
) -> tuple[torch.Tensor, torch.Tensor, SpaceReport, SpaceReport]:
    """Plans over KV groups [Hkv] and over query heads [H] (block structure: a query head goes
    only where its group goes, with the inner plan of that pair of groups)."""
    r, g = geo.group, geo.kv_heads
    cost_q = pairwise_sq_dist(fa_q, fb_q)  # [H, H]
    inner = (
        torch.ones(g, g, r, r, device=cost_q.device)
        if r == 1
        else torch.empty(g, g, r, r, device=cost_q.device)
    )
    inner_perm: dict[tuple[int, int], torch.Tensor] = {}
    kv_cost = pairwise_sq_dist(fa_kv, fb_kv)
    group_cost = kv_cost.clone()
    inner_seconds, inner_certified, inner_solver = 0.0, 1.0, solver.solver
    for a in range(g):
        for b in range(g):
            sub = cost_q[a * r : (a + 1) * r, b * r : (b + 1) * r]
            if r > 1:
                q_plan, q_info = solver.plan(sub)
                inner[a, b] = dense(q_plan)
                if q_plan.ndim == 1:
                    inner_perm[a, b] = q_plan
                inner_seconds += q_info.seconds
                inner_solver = q_info.solver
                inner_certified = (
                    None
                    if q_info.certified is None or inner_certified is None
                    else min(inner_certified, q_info.certified)
                )
            group_cost[a, b] += (inner[a, b] * sub).sum()
    kv_plan, kv_info = solver.plan(group_cost)
    if kv_plan.ndim == 1 and (r == 1 or len(inner_perm) == g * g):
        # Query head i of group a goes to head j of group kv_plan[a], j as the inner plan says.
        groups = kv_plan.tolist()
        q_plan = torch.cat(
            [
                groups[a] * r
                + (inner_perm[a, groups[a]].cpu() if r > 1 else torch.zeros(1, dtype=torch.long))
                for a in range(g)
            ]
        ).to(cost_q.device)
    else:  # P_q[(a, i), (b, j)] = P_kv[a, b] * inner[a, b][i, j]
        q_plan = (dense(kv_plan)[:, :, None, None] * inner).permute(0, 2, 1, 3).reshape(geo.heads, geo.heads)
    kv_report = _report(kv_plan, kv_info, kv_cost, sq_norms([fa_kv]), sq_norms([fb_kv]), kv_info.seconds)
    q_sharp = 1.0 if q_plan.ndim == 1 else q_plan.max(dim=1).values.mean().item()
    q_info = PlanInfo(inner_solver, inner_seconds, 0, q_sharp, inner_certified if q_plan.ndim == 1 else None)
    q_report = _report(q_plan, q_info, cost_q, sq_norms([fa_q]), sq_norms([fb_q]), inner_seconds)
    return kv_plan, q_plan, kv_report, q_report


TRANSPORTED = ("mlp", "kv_heads", "q_heads", "experts", "expert_mlp")
"""Spaces the transport moves; ``residual``, ``head_dim`` and ``gate_scalar`` (Qwen2-MoE's
one-row shared-expert gate) never move. A block with a tensor in any other space (a state-space
layer's channels) cannot be aligned."""
FIXED = ("residual", "head_dim", "gate_scalar")


def unaligned_tensors(arch: Architecture, suffixes) -> list[str]:
    """Tensors of a block living in a space the OT code knows nothing of."""
    known = {*TRANSPORTED, *FIXED}
    return [s for s in suffixes if arch.block[s].spaces() - known]


def align_block(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    arch: Architecture,
    geo: HeadGeometry,
    solver: SolverSettings,
    features_a: dict[str, torch.Tensor] | None = None,
    features_b: dict[str, torch.Tensor] | None = None,
    expert_cost: str = "weights+router",
) -> tuple[dict[str, torch.Tensor], dict[str, SpaceReport]]:
    """A with its units moved to B's order, and a report per space. Features default to weights
    (experts are aligned on weights only); ``expert_cost``: how experts are paired
    (:func:`deus_dist.ot.experts.align_experts`)."""
    unknown = unaligned_tensors(arch, a)
    if unknown:
        raise ValueError(f"no transport is defined for the spaces of {unknown}")
    stored = features_a is None
    fa_src = a if features_a is None else features_a
    fb_src = b if features_b is None else features_b
    aligned = dict(a)
    reports: dict[str, SpaceReport] = {}
    units = space_units(a, arch, geo)
    spaces = set().union(*(arch.block[s].spaces() for s in a))
    if "mlp" in spaces:
        m = units["mlp"]
        plan, reports["mlp"] = mlp_plan(
            unit_feature_parts(fa_src, arch, "mlp", m, units, stored),
            unit_feature_parts(fb_src, arch, "mlp", m, units, stored),
            solver,
        )
        apply_plan(aligned, arch, "mlp", plan, units)
    if arch.experts():
        from deus_dist.ot.experts import align_experts

        aligned, expert_reports = align_experts(aligned, b, arch, solver, expert_cost)
        reports.update(expert_reports)
    if "kv_heads" in spaces:
        kv_plan, q_plan, reports["kv_heads"], reports["q_heads"] = head_plans(
            unit_features(fa_src, arch, "kv_heads", geo.kv_heads, units, stored),
            unit_features(fb_src, arch, "kv_heads", geo.kv_heads, units, stored),
            unit_features(fa_src, arch, "q_heads", geo.heads, units, stored),
            unit_features(fb_src, arch, "q_heads", geo.heads, units, stored),
            geo,
            solver,
        )
        apply_plan(aligned, arch, "kv_heads", kv_plan, units)
        apply_plan(aligned, arch, "q_heads", q_plan, units)
    return aligned, reports
