"""``opt-deus``: optimal-transport depth up-scaling (arXiv 2508.08011).

For each new block between base layers k and k+1 (A, B): A's units are transported onto B's order
space by space (KV groups, query heads within groups, MLP neurons; on mixture-of-experts blocks the
routed experts with their router rows, and the neurons inside each matched pair of experts; the
residual stream never moves), then fused = (1 - t) * aligned A + t * B, and o_proj/down_proj are
zeroed so the up-scaled model computes exactly what the base did (``--no_zero_init`` keeps
them). ``--ot_variant reference`` reproduces the authors' released code instead (see
``deus_dist/ot/reference.py``).
"""

from __future__ import annotations

from dataclasses import asdict

from deus_dist.errors import UserError
from deus_dist.methods.base import Method, register, zero_outputs
from deus_dist.ot.align import HeadGeometry, SolverSettings, align_block, space_size, unaligned_tensors


def unaligned_pair_problems(reader, arch, plan) -> list[str]:
    """New blocks whose source layers hold tensors no transport is defined for (a state-space
    layer of a hybrid): refused, naming the gaps, rather than fused unaligned."""
    bad: dict[str, list[int]] = {}
    tensors: dict[str, list[str]] = {}
    for src in plan.layers:
        if not src.new:
            continue
        k = src.base[0]
        unknown = unaligned_tensors(arch, [s for s in arch.block if arch.layer_name(k, s) in reader.tensors])
        if unknown:
            kind = arch.block[unknown[0]].layer_type or arch.family
            bad.setdefault(kind, []).append(k)
            tensors[kind] = unknown
    return [
        f"--method opt-deus: gaps {gaps} join two {kind} layers, whose tensors {tensors[kind][:3]} live in "
        f"spaces no transport is defined for (see the README's family table); choose --positions "
        f"between layers of an aligned type, or --method llama-pro / copy for these layers"
        for kind, gaps in bad.items()
    ]


@register
class OptDeus(Method):
    name = "opt-deus"
    pair = True
    function_preserving = True
    parallel = True
    options = (
        "ot_variant",
        "ot_solver",
        "ot_tol",
        "ot_reg",
        "ot_max_iter",
        "ot_cost",
        "calib_data",
        "calib_tokens",
        "fuse_weight",
        "zero_init",
        "ot_expert_cost",
    )

    def prepare(self, reader, arch, plan, cfg, block_suffixes=None):
        problems = []
        if not 0.0 <= cfg.fuse_weight <= 1.0:
            problems.append(f"--fuse_weight must be in [0, 1], got {cfg.fuse_weight}")
        if cfg.ot_reg <= 0:
            problems.append(f"--ot_reg must be positive, got {cfg.ot_reg}")
        if not 0.0 < cfg.ot_tol < 1.0:
            problems.append(f"--ot_tol must be in (0, 1), got {cfg.ot_tol}")
        if cfg.ot_max_iter < 1:
            problems.append(f"--ot_max_iter must be at least 1, got {cfg.ot_max_iter}")
        if cfg.ot_cost == "activations" and cfg.calib_tokens < 16:
            problems.append(f"--calib_tokens must be at least 16, got {cfg.calib_tokens}")
        if arch.experts() and cfg.ot_cost == "activations" and cfg.ot_variant == "aligned":
            problems.append(
                "--ot_cost activations: not available on mixture-of-experts blocks (transformers runs "
                "the experts stacked, so one expert's activations cannot be hooked); use --ot_cost weights"
            )
        if cfg.ot_variant == "reference":
            from deus_dist.ot.reference import check_supported

            try:
                check_supported(block_suffixes or list(arch.block), arch.family)
            except UserError as e:
                problems.extend(e.problems)
        problems += unaligned_pair_problems(reader, arch, plan)
        if problems:
            raise UserError(problems)
        self.cfg = cfg
        self.arch = arch
        self.geo = HeadGeometry.from_config(reader.config, arch)
        self.solver = SolverSettings(cfg.ot_solver, cfg.ot_reg, cfg.ot_max_iter, cfg.ot_tol)
        self.function_preserving = cfg.zero_init
        names = {s: arch.layer_name(0, s) for s in block_suffixes or arch.block}
        shapes = {s: tuple(reader.tensors[n].shape) for s, n in names.items() if n in reader.tensors}
        # Neuron spaces and how many plans each needs per block: (units, width, plans).
        self.neuron_spaces = []
        self.kept_bytes = 0
        mlp = space_size(arch, shapes, "mlp")
        if mlp is not None:
            self.neuron_spaces.append((*mlp, 1))
        if arch.experts():
            from deus_dist.ot.experts import expert_units

            experts, units, width = expert_units(arch, shapes)
            pairs = experts if cfg.ot_expert_cost == "router" else experts * experts + experts
            self.neuron_spaces.append((units, width, pairs))
            if cfg.ot_expert_cost != "router":
                # the E^2 pairs' neuron permutations, kept until the experts are matched (int64)
                self.kept_bytes = experts * experts * units * 8
        self.mlp_units = max((n for n, _, _ in self.neuron_spaces), default=0)
        self.runner = None
        if cfg.ot_cost == "activations" and cfg.ot_variant == "aligned":
            import torch

            from deus_dist.ot.activations import ActivationRunner, calibration_tokens

            ids = calibration_tokens(reader.path, cfg.calib_data, cfg.calib_tokens)
            self.runner = ActivationRunner(reader, arch, ids, torch.device(cfg.device))
        # Activation features come from running the base model layer by layer in this process.
        self.parallel = self.runner is None

    def new_block(self, sources, layers, arch, device):
        a, b = sources
        key = f"{layers[0]}-{layers[1]}"
        if self.cfg.ot_variant == "reference":
            from deus_dist.ot.reference import reference_fuse

            block, report = reference_fuse(a, b)
            self.reports[key] = report
        else:
            fa = fb = None
            if self.runner is not None:
                fa, fb = self.runner.features(layers[0], a, b)
            aligned, reports = align_block(
                a, b, arch, self.geo, self.solver, fa, fb, expert_cost=self.cfg.ot_expert_cost
            )
            t = self.cfg.fuse_weight
            # In place where alignment already made a copy: one block less at the peak.
            block = {
                s: (x.mul_(1 - t) if x is not a[s] else x * (1 - t)).add_(b[s], alpha=t)
                for s, x in aligned.items()
            }
            self.reports[key] = {space: asdict(r) for space, r in reports.items()}
        return zero_outputs(block, arch) if self.cfg.zero_init else block

    def describe(self):
        c = self.cfg
        if c.ot_variant == "reference":
            from deus_dist.ot import reference

            return {
                "ot_variant": "reference",
                "reg": reference.REG,
                "num_iter": reference.NUM_ITER,
                "zero_init": c.zero_init,
            }
        out = {
            "ot_variant": c.ot_variant,
            "ot_solver": c.ot_solver,
            "ot_cost": c.ot_cost,
            "fuse_weight": c.fuse_weight,
            "zero_init": c.zero_init,
        }
        if c.ot_solver == "sinkhorn":
            out.update(ot_reg=c.ot_reg, ot_max_iter=c.ot_max_iter)
        if c.ot_solver == "auction":
            out.update(ot_tol=c.ot_tol)
        if c.ot_cost == "activations":
            out.update(
                calib_data=c.calib_data or "embedded Wikipedia sample (train slice)",
                calib_tokens=c.calib_tokens,
            )
        if self.arch.experts():
            out.update(ot_expert_cost=c.ot_expert_cost, expert_matching="exact")
        return out

    def working_bytes(self, block_bytes):
        """Sources, the aligned copy that becomes the new block, the MLP cost and the solver's own
        copy of it (exact: float64; sinkhorn: a few float64 n x n temporaries), and on a
        mixture-of-experts block the expert pairs' neuron plans."""
        n2 = self.mlp_units**2 * 4
        solver = {"auction": 1, "exact": 2, "emd": 4, "sinkhorn": 6}[self.cfg.ot_solver]
        return 3 * block_bytes + (1 + solver) * n2 + self.kept_bytes

    def block_flops(self):
        # Each neuron cost: an n x n product over gate rows, up rows and down columns (3 x width);
        # a mixture-of-experts block needs one per pair of experts (and per matched pair again).
        return sum(2.0 * units**2 * 3 * width * plans for units, width, plans in self.neuron_spaces)

    def summary(self):
        diagnostics = self.diagnostics()
        if not diagnostics:
            return []
        if self.cfg.ot_variant == "reference":
            lines = [f"{'pair':>7s} {'matrix':28s} {'secs':>7s} {'mass':>7s} {'sharp':>6s} warned"]
            for pair, mats in diagnostics.items():
                for name, r in mats.items():
                    lines.append(
                        f"{pair:>7s} {name:28s} {r['seconds']:7.3f} {r['plan_mass']:7.3f} "
                        f"{r['sharpness']:6.3f} {r['numerical_warning']}"
                    )
            return lines
        lines = [
            f"{'pair':>7s} {'space':9s} {'units':>6s} {'solver':8s} {'secs':>7s} "
            f"{'sim matched':>11s} {'sim identity':>12s} {'sharpness':>9s} {'certified':>9s}"
        ]
        for pair, spaces in diagnostics.items():
            for space, r in spaces.items():
                lines.append(
                    f"{pair:>7s} {space:9s} {r['units']:6d} {r['solver']:8s} {r['seconds']:7.3f} "
                    f"{r['matched_similarity']:11.4f} {r['identity_similarity']:12.4f} {r['sharpness']:9.3f} "
                    f"{'-' if r['certified'] is None else format(r['certified'], '9.4f'):>9s}"
                )
        return lines
