"""``tools/plan_memory.py``: per-GPU memory of training the new layers, for each sharding."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Literal

from deus_dist.cli.args import tool_main
from deus_dist.errors import UserError

DESCRIPTION = """\
Will it fit, and which DeepSpeed config is fastest? Per GPU, for ZeRO-1, ZeRO-2, ZeRO-3 (as shipped)
and ZeRO-3 with CPU offload: frozen and trainable weights, gradients, optimizer state (trainable
parameters only), saved activations (from the lowest trainable layer up), communication buffers and
working memory, in GiB; then the fastest choice that fits --gpu_memory with --headroom left, or
what would fit. With --base, the placements top / interleaved / bottom side by side.

examples:
  python tools/plan_memory.py --model upscaled/Llama-3.1-8B-opt-deus-48L --gpus_per_node 8
  python tools/plan_memory.py --base llama-3.1-8b --placement top --gpu_memory 80
  python tools/plan_memory.py --base llama-3.1-70b --nodes 4 --activation_checkpointing --json
  python tools/plan_memory.py --base path/to/config.json --method llama-pro --seq_len 4096
"""


@dataclass
class PlanMemoryConfig:
    """Options of ``tools/plan_memory.py``."""

    model: str | None = None
    """An up-scaled checkpoint directory (config.json + deus_manifest.json): its new layers train."""
    base: str | None = None
    """Instead of --model: the base to be up-scaled, as a shape name (llama-3.2-1b, llama-3.1-8b,
    llama-3.1-70b, smollm2-135m, small), a config.json, or a model directory; the fuse tool's plan
    for --method/--placement/--num_new says which layers are new."""
    method: str = "opt-deus"
    """With --base: the up-scaling method whose layer plan is sized."""
    placement: Literal["top", "bottom", "middle", "top-bottom", "interleaved"] | None = None
    """With --base: which gaps get new blocks. Default: the method's."""
    num_new: int | None = None
    """With --base: how many new blocks. Default: L/2."""
    trainable: Literal["new", "all"] = "new"
    """What trains: the new layers, or every layer."""
    train_embeddings: bool = False
    """Also train the embeddings and the output head."""
    gpus_per_node: int = 8
    """GPUs (ranks) per node."""
    nodes: int = 1
    """Nodes."""
    seq_len: int = 2048
    """Tokens per sequence."""
    micro_batch: int = 4
    """Sequences per GPU per forward pass."""
    grad_accum: int = 8
    """Micro-batches per optimizer step (ZeRO-1 keeps full gradients between them)."""
    global_batch: int | None = None
    """Sequences per optimizer step, if fixed: it must split into --micro_batch x GPUs x accumulation
    (the accumulation is then global_batch / (micro_batch x GPUs), and --grad_accum is not used)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Compute precision (bf16: fp32 masters and moments)."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward: only each layer's input is kept."""
    gpu_memory: float = 80.0
    """GiB of memory per GPU (80 for an H100/A100-80GB, 141 for an H200)."""
    headroom: float = 0.1
    """Share of --gpu_memory left free (allocator fragmentation, CUDA context, NCCL)."""
    host_memory: float | None = None
    """GiB of host memory per node, to check CPU offload against. Default: not checked."""
    compare_placements: bool | None = None
    """Also print top / interleaved / bottom side by side. Default: on with --base."""
    json: bool = False
    """Print the plan as JSON (every choice, every part in bytes, and the total) instead."""


def _problems(cfg: PlanMemoryConfig) -> list[str]:
    problems = []
    if (cfg.model is None) == (cfg.base is None):
        problems.append(
            "give one of --model (an up-scaled checkpoint) or --base (a shape, config.json or directory)"
        )
    if cfg.model is not None:
        for name in ("placement", "num_new"):
            if getattr(cfg, name) is not None:
                problems.append(
                    f"--{name}: --model's manifest already says which layers are new; drop it or use --base"
                )
    for name, low in (
        ("gpus_per_node", 1),
        ("nodes", 1),
        ("seq_len", 2),
        ("micro_batch", 1),
        ("grad_accum", 1),
    ):
        if getattr(cfg, name) < low:
            problems.append(f"--{name} must be at least {low}, got {getattr(cfg, name)}")
    if cfg.gpu_memory <= 0:
        problems.append(f"--gpu_memory must be positive (GiB), got {cfg.gpu_memory}")
    if not 0 <= cfg.headroom < 1:
        problems.append(f"--headroom must be in [0, 1), got {cfg.headroom}")
    if cfg.global_batch is not None and not problems:
        per_step = cfg.micro_batch * cfg.gpus_per_node * cfg.nodes
        if cfg.global_batch < per_step or cfg.global_batch % per_step:
            problems.append(
                f"--global_batch {cfg.global_batch} cannot be split over {cfg.nodes} node(s) x {cfg.gpus_per_node} GPUs "
                f"x --micro_batch {cfg.micro_batch} = {per_step} sequences per micro-step: use fewer GPUs "
                f"(--gpus_per_node/--nodes), a smaller --micro_batch, or a --global_batch that is a multiple of {per_step}"
            )
    return problems


def _base_config(base: str) -> tuple[str, dict]:
    from deus_dist.train.memory_plan import BASE_SHAPES, read_config_json

    if base in BASE_SHAPES:
        return base, {"model_type": "llama", **BASE_SHAPES[base]}
    if "/" not in base and not base.endswith(".json"):
        raise UserError(
            f"--base: {base!r} is no shape name ({', '.join(BASE_SHAPES)}), config.json or directory"
        )
    return base, read_config_json(base, "--base")


def build(cfg: PlanMemoryConfig):
    """(plan, placement plans or None): validated, sized."""
    from deus_dist.train.memory_plan import (
        RunShape,
        layout,
        make_plan,
        read_config_json,
        shape_from_config,
        upscaled_config,
    )

    problems = _problems(cfg)
    if problems:
        raise UserError(problems)
    per_step = cfg.micro_batch * cfg.gpus_per_node * cfg.nodes
    run = RunShape(
        gpus_per_node=cfg.gpus_per_node,
        nodes=cfg.nodes,
        seq_len=cfg.seq_len,
        micro_batch=cfg.micro_batch,
        grad_accum=cfg.global_batch // per_step if cfg.global_batch else cfg.grad_accum,
        precision=cfg.precision,
        activation_checkpointing=cfg.activation_checkpointing,
    )
    kw = dict(gpu_memory_gib=cfg.gpu_memory, headroom=cfg.headroom, host_memory_gib=cfg.host_memory)
    if cfg.model is not None:
        from pathlib import Path

        from deus_dist.checkpoint.manifest import read_manifest

        config = read_config_json(cfg.model, "--model")
        manifest = read_manifest(Path(cfg.model))
        if manifest is None and cfg.trainable == "new":
            raise UserError(
                f"--model {cfg.model} has no deus_manifest.json, so its new layers are unknown: pass "
                "--trainable all, or --base with --placement"
            )
        new = manifest["new_layers"] if manifest else []
        if cfg.trainable == "new" and not new:
            raise UserError(f"--model {cfg.model}: its manifest lists no new layers; nothing would train")
        shape = shape_from_config(config, new, cfg.trainable, cfg.train_embeddings)
        return make_plan(shape, run, model=cfg.model, **kw), None
    name, base = _base_config(cfg.base)
    base_layers = base.get("num_hidden_layers")
    if not isinstance(base_layers, int) or base_layers < 2:
        raise UserError(f"--base {cfg.base}: num_hidden_layers must be an integer of at least 2")

    def one(placement):
        layers, new = layout(base_layers, cfg.method, placement, cfg.num_new)
        shape = shape_from_config(upscaled_config(base, layers), new, cfg.trainable, cfg.train_embeddings)
        label = f"{name} {cfg.method} {placement or 'default'} {base_layers} -> {layers}"
        return make_plan(shape, run, model=label, **kw)

    plan = one(cfg.placement)
    compare = cfg.compare_placements if cfg.compare_placements is not None else cfg.method != "solar"
    rows = {p: one(p) for p in ("top", "interleaved", "bottom")} if compare else None
    return plan, rows


def run(cfg: PlanMemoryConfig) -> dict:
    from deus_dist.train.memory_plan import format_placements, format_plan

    plan, rows = build(cfg)
    report = plan.to_json()
    if rows:
        report["placements"] = {p: r.to_json() for p, r in rows.items()}
    if cfg.json:
        print(json.dumps(report, indent=2))
        return report
    print("\n".join(format_plan(plan)))
    if rows:
        print()
        print("\n".join(format_placements(rows)))
    return report


def main(argv: list[str] | None = None) -> int:
    return tool_main("plan_memory.py", PlanMemoryConfig, DESCRIPTION, run, argv)


if __name__ == "__main__":
    sys.exit(main())
