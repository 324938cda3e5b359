"""Equal compute: how many steps each arm's stages get so that every arm spends what the baseline
spends in its nominal steps.

Per stage s of an arm, one optimizer step costs
- ``tokens``: T_s = micro_batch * grad_accum * ranks * seq_len;
- ``flops``: T_s * F_s, with F_s the matmul FLOPs per trained token of the stage's model
  (``deus_dist.flops.flops_per_token``: the forward through every layer and the head,
  attention halved for the causal mask; the backward's input gradients from the lowest trainable
  layer up; weight gradients of the trainable parameters only; a routed expert's tensors count
  ``num_experts_per_tok / E``, the share a token goes through, as MFU counts them);
- ``seconds``: the stage's measured seconds per step (a short timed run, once per stage, kept).

The budget B is the baseline's sum over its stages of nominal_steps * cost. Every arm gets
steps_s = round(k * nominal_s) with k = B / sum_s(nominal_s * cost_s): an arm's stages keep the
proportions of their nominal lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from deus_dist.configs import FuseConfig, device_defaults, global_batch
from deus_dist.errors import UserError
from deus_dist.study.spec import Arm, Study


@dataclass
class Shape:
    """What one model costs: per-layer parameter counts and the head's."""

    layer_params: list[int]
    head_params: int
    hidden: int
    embed_params: int
    total_params: int
    """Every tensor of the checkpoint (tied weights once)."""
    used_layer_params: list[float] | None = None
    """Per layer, the parameters one token goes through (what FLOPs count): a routed expert's
    tensors by ``num_experts_per_tok / E`` (``Architecture.routed_share``); None: ``layer_params``."""

    @property
    def flop_params(self) -> list[float]:
        return self.used_layer_params if self.used_layer_params is not None else self.layer_params


@dataclass
class StagePlan:
    index: int
    fuse: dict
    train: dict
    nominal_steps: int
    layers_before: int
    layers_after: int
    new_layers: list[int]
    tokens_per_step: int
    flops_per_token: float
    seconds_per_step: float | None = None
    steps: int = 0

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    def cost(self, budget: str) -> float | None:
        if budget == "tokens":
            return float(self.tokens_per_step)
        if budget == "flops":
            return self.tokens_per_step * self.flops_per_token
        return self.seconds_per_step


@dataclass
class ArmPlan:
    name: str
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.stages)

    @property
    def seconds(self) -> float | None:
        if any(s.seconds_per_step is None for s in self.stages):
            return None
        return sum(s.steps * s.seconds_per_step for s in self.stages)


def base_shape(base_dir: Path) -> Shape:
    """Parameter counts from a checkpoint's tensor shapes (no weights read): every decoder layer
    has layer 0's shapes (new blocks are made from layers of the same shapes)."""
    from deus_dist.architectures import architecture_for
    from deus_dist.checkpoint import CheckpointReader
    from deus_dist.checkpoint.layout import read_as_loaded

    with CheckpointReader(base_dir) as reader:
        cfg = reader.config
        arch = architecture_for(cfg)
        tensors = read_as_loaded(reader).tensors  # no mask buffers, transformers' names
        first = {
            s[1]: math.prod(info.shape)
            for n, info in tensors.items()
            if (s := arch.split_name(n)) and s[0] == 0
        }
        layer = sum(first.values())
        share = arch.routed_share(cfg)
        used = sum(n * (share if arch.is_routed(suffix) else 1.0) for suffix, n in first.items())
        embed = sum(math.prod(tensors[n].shape) for n in arch.embeddings if n in tensors)
        total = sum(math.prod(info.shape) for info in tensors.values())
    layers = arch.config_value(cfg, "num_hidden_layers")
    return Shape(
        [layer] * layers,
        arch.config_value(cfg, "vocab_size") * arch.config_value(cfg, "hidden_size"),
        arch.config_value(cfg, "hidden_size"),
        embed,
        total,
        used_layer_params=[used] * layers,
    )


def trained_params(plan: ArmPlan, final: Shape) -> int:
    """Parameters an arm trains over its stages (``final``: the shape after the last stage): the
    new blocks of every stage (and the embeddings with train_embeddings), or all of them."""
    if any(s.train.get("trainable", "new") == "all" for s in plan.stages):
        return final.total_params
    blocks = sum(len(s.new_layers) for s in plan.stages) * final.layer_params[0]
    embeddings = any(s.train.get("train_embeddings") for s in plan.stages)
    return blocks + (final.embed_params if embeddings else 0)


def plan_arm(study: Study, arm: Arm, shape: Shape, ranks: int, cuda: bool) -> ArmPlan:
    """The stages' layouts and per-step costs (steps not yet set)."""
    from deus_dist.flops import flops_per_token
    from deus_dist.methods import get_method

    out = ArmPlan(arm.name)
    layers = len(shape.layer_params)
    per_layer = shape.flop_params[0]  # what a token goes through: FLOPs, not parameter counts
    defaults = device_defaults(cuda)
    for i, stage in enumerate(arm.stages):
        fuse_cfg = FuseConfig(**stage.fuse)
        plan = get_method(fuse_cfg.method).plan(layers, fuse_cfg)
        train = stage.train
        seq_len = train.get("seq_len") or defaults["seq_len"]
        micro = train.get("micro_batch") or defaults["micro_batch"]
        accum = train.get("grad_accum") or defaults["grad_accum"]
        trainable = train.get("trainable", "new")
        if trainable not in ("new", "all"):
            raise UserError(
                f"arm {arm.name!r}: train: trainable {trainable!r}: a study counts FLOPs for new or all"
            )
        after = plan.num_layers_after
        chosen = set(range(after)) if trainable == "all" else set(plan.new_layers)
        all_layers = [per_layer] * after
        fpt = flops_per_token(
            layer_params=all_layers,
            trainable_layer_params=[p if j in chosen else 0 for j, p in enumerate(all_layers)],
            head_params=shape.head_params,
            hidden=shape.hidden,
            seq_len=seq_len,
            embeddings_train=trainable == "all" or bool(train.get("train_embeddings")),
        )
        out.stages.append(
            StagePlan(
                index=i + 1,
                fuse=stage.fuse,
                train=train,
                nominal_steps=int(train["max_steps"]),
                layers_before=layers,
                layers_after=after,
                new_layers=plan.new_layers,
                tokens_per_step=global_batch(micro, accum, ranks) * seq_len,
                flops_per_token=fpt,
            )
        )
        layers = after
    return out


def assign_steps(plans: list[ArmPlan], baseline: str, budget: str) -> list[str]:
    """Set every stage's steps so each arm spends the baseline's budget; returns problems (an arm
    left with zero steps in a stage)."""
    base = next(p for p in plans if p.name == baseline)
    if any(s.cost(budget) is None for p in plans for s in p.stages):
        return []  # seconds budget before calibration: steps come later
    total = sum(s.nominal_steps * s.cost(budget) for s in base.stages)
    problems = []
    for plan in plans:
        nominal = sum(s.nominal_steps * s.cost(budget) for s in plan.stages)
        k = total / nominal
        for s in plan.stages:
            s.steps = s.nominal_steps if plan.name == baseline else round(k * s.nominal_steps)
            if s.steps < 1:
                problems.append(
                    f"budget: arm {plan.name!r} stage {s.index} gets 0 steps for the baseline's {budget} "
                    f"({k * s.nominal_steps:.2f}); give the baseline more steps or this stage a larger share"
                )
    return problems
