"""The DeepSpeed JSON, with our options as the one source of truth for batch and optimizer values.

``"auto"`` (or a missing key) is filled from the launcher's options; an explicit value that
disagrees with them is an error naming both. The batch formula is
``train_batch_size = micro_batch * grad_accum * world_size``. The launcher owns the learning-rate
schedule, so a ``scheduler`` section is refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from deus_dist.configs import global_batch
from deus_dist.errors import UserError
from deus_dist.resources import default_ds_config  # noqa: F401  (the shipped configs: package data)


def load_ds_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--ds_config: {p} does not exist (see ds_configs/ for the shipped ones)")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--ds_config: {p} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"--ds_config: {p} must hold a JSON object")
    return raw


def _fill(section: dict, key: str, value, option: str, where: str, problems: list[str]) -> None:
    have = section.get(key, "auto")
    if have == "auto":
        section[key] = value
    elif have != value:
        problems.append(f"{option} {value} disagrees with {where}={have} in --ds_config; change one of them")


def resolve_ds_config(
    raw: dict,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    betas: list[float],
    weight_decay: float,
    grad_clip: float,
    hidden_size: int,
    cuda: bool,
    precision: str = "auto",
    bf16_supported: bool | None = None,
) -> dict:
    """A copy of ``raw`` with every "auto" resolved and checked against our options.

    ``precision`` (auto, bf16, fp32) fills ``"bf16": {"enabled": "auto"}``; auto means bf16 on GPUs
    that support it (``bf16_supported``, default: the same as ``cuda``) and fp32 elsewhere. An explicit
    bf16/fp16 setting in the JSON that contradicts an explicit --precision is an error.
    """
    cfg = copy.deepcopy(raw)
    cfg.pop("_comment", None)
    problems: list[str] = []
    _fill(
        cfg,
        "train_micro_batch_size_per_gpu",
        micro_batch,
        "--micro_batch",
        "train_micro_batch_size_per_gpu",
        problems,
    )
    _fill(
        cfg,
        "gradient_accumulation_steps",
        grad_accum,
        "--grad_accum",
        "gradient_accumulation_steps",
        problems,
    )
    batch = global_batch(micro_batch, grad_accum, world_size)
    if cfg.get("train_batch_size", "auto") not in ("auto", batch):
        problems.append(
            f"train_batch_size={cfg['train_batch_size']} in --ds_config is not --micro_batch * --grad_accum"
            f" * world size = {micro_batch} * {grad_accum} * {world_size} = {batch}; set it to "
            '"auto" or change --micro_batch/--grad_accum'
        )
    cfg["train_batch_size"] = batch
    _fill(cfg, "gradient_clipping", grad_clip, "--grad_clip", "gradient_clipping", problems)
    if "scheduler" in cfg:
        problems.append(
            "--ds_config has a 'scheduler' section: the launcher owns the schedule "
            "(--lr, --warmup_steps, --min_lr_ratio); remove it"
        )
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": not cuda}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        problems.append(f"--ds_config: optimizer type {opt.get('type')!r} is not supported; use AdamW")
    params = opt.setdefault("params", {})
    _fill(params, "lr", lr, "--lr", "optimizer.params.lr", problems)
    _fill(params, "betas", list(betas), "--adam_betas", "optimizer.params.betas", problems)
    _fill(params, "weight_decay", weight_decay, "--weight_decay", "optimizer.params.weight_decay", problems)
    if params.get("eps", "auto") == "auto":
        params["eps"] = 1e-8
    bf16_auto = cuda if bf16_supported is None else bf16_supported
    want_bf16 = {"auto": bf16_auto, "bf16": True, "fp32": False}[precision]
    for name, default in (("bf16", want_bf16), ("fp16", False)):
        section = cfg.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = default
        elif precision != "auto" and bool(section["enabled"]) != (name == precision):
            problems.append(
                f"--precision {precision} disagrees with {name}.enabled={section['enabled']} in --ds_config; "
                f'change one of them (or set "{name}": {{"enabled": "auto"}})'
            )
    if cfg["bf16"]["enabled"] and cfg["fp16"]["enabled"]:
        problems.append("--ds_config enables both bf16 and fp16; enable one")
    zero = cfg.setdefault("zero_optimization", {"stage": 3})
    autos = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in autos.items():
        if zero.get(key) == "auto":
            zero[key] = value
    left = sorted(_autos(cfg))
    if left:
        problems.append(f"--ds_config: no value known for {', '.join(left)}; set them explicitly")
    problems += [] if problems else deepspeed_refusals(cfg)
    if problems:
        raise UserError(problems)
    return cfg


def deepspeed_refusals(cfg: dict) -> list[str]:
    """What DeepSpeed's own config class (``DeepSpeedConfig`` and its pydantic models) refuses in a
    resolved config, e.g. a ZeRO stage that does not exist: found while validating, before any data
    is packed or any rank starts, instead of as a traceback from ``deepspeed.initialize``."""
    import contextlib
    import io

    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    trial = copy.deepcopy(cfg)
    trial.pop("train_batch_size")  # DeepSpeed derives it for the world it sees, perhaps none yet
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            DeepSpeedConfig(trial)
    except pydantic.ValidationError as e:
        return [
            f"--ds_config: DeepSpeed refuses {'.'.join(map(str, err['loc'])) or 'it'}={err.get('input')!r}: "
            f"{err['msg']}"
            for err in e.errors()
        ]
    except (ValueError, AssertionError, KeyError, TypeError) as e:
        return [
            f"--ds_config: DeepSpeed refuses it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ]
    return []


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def precision_name(cfg: dict) -> str:
    """bf16, fp16 or fp32: what a resolved DeepSpeed config computes in."""
    return "bf16" if cfg["bf16"]["enabled"] else "fp16" if cfg["fp16"]["enabled"] else "fp32"


def compute_dtype(cfg: dict):
    import torch

    if cfg["bf16"]["enabled"]:
        return torch.bfloat16
    if cfg["fp16"]["enabled"]:
        return torch.float16
    return torch.float32
