"""Everything a training run needs, validated and built: options, data, model in ZeRO-3, state.

``prepare`` checks every option against the inputs before any process group exists (one
UserError listing all problems); ``build`` loads the model straight into ZeRO-3 partitions
(``HfDeepSpeedConfig`` alive during ``from_pretrained``), freezes all but the trainable set and
hands only the trainable parameters to DeepSpeed's optimizer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deus_dist.architectures import Architecture, architecture_for
from deus_dist.checkpoint import CheckpointReader
from deus_dist.checkpoint.hub import context_problems, is_hub_name, resolve_model_path
from deus_dist.checkpoint.manifest import read_manifest
from deus_dist.configs import FuseConfig, TrainConfig, device_defaults
from deus_dist.errors import Problems, UserError
from deus_dist.hf_logging import quiet_transformers
from deus_dist.train import checkpointing
from deus_dist.train.cluster import once_per_filesystem
from deus_dist.train.data import PackedData
from deus_dist.train.dist import DistEnv
from deus_dist.train.ds_config import (
    compute_dtype,
    default_ds_config,
    load_ds_config,
    precision_name,
    resolve_ds_config,
)
from deus_dist.train.trainable import trainable_names


@dataclass
class Plan:
    """Validated options and what they resolve to (no model yet)."""

    cfg: TrainConfig
    """The options with every default filled (device defaults, or the checkpoint's on a resume)."""
    model_dir: Path
    arch: Architecture
    manifest: dict | None
    model_config: dict
    ds_config: dict
    trainable: list[str]
    resume_from: Path | None
    run_dir: Path
    identity: str
    """Fingerprint of --model (checkpointing.model_identity), checked on resume."""
    data: Any
    """The data pipeline's spec: sources and cache key."""
    pipeline: Any
    """data.TextPipeline or chat_data.ChatPipeline."""
    world_size: int
    resumed: checkpointing.TrainState | None = None
    """The state of ``resume_from``, read before any rank starts."""

    @property
    def convert(self) -> bool:
        """The checkpoint was written by another world size: resume through DeepSpeed's universal
        format."""
        return self.resumed is not None and self.resumed.world_size != self.world_size

    @property
    def global_batch(self) -> int:
        return self.cfg.micro_batch * self.cfg.grad_accum * self.world_size

    @property
    def precision(self) -> str:
        return precision_name(self.ds_config)


def default_model(log=print) -> Path:
    """tools/fuse_layers.py's default output (embedded SmolLM2, opt-deus), made if missing."""
    from deus_dist import upscale

    out = upscale.default_output(FuseConfig())
    if not out.exists():
        log(f"--model not given: up-scaling the embedded model first into {out}")
        upscale.run(FuseConfig(), log=log)
    return out


def resolve_model(value: str | None, env: DistEnv, log=print) -> Path:
    """``--model`` as a local directory: the default up-scaled model made first if missing, or a hub
    model downloaded, once per filesystem (rank 0, or each node's first rank when the directory is
    node-local) while the other ranks wait outside any collective."""
    if value is None:
        from deus_dist import upscale

        where = upscale.default_output(FuseConfig()).absolute().parent
        return once_per_filesystem(where, env, "model", lambda: default_model(log))
    if is_hub_name(value):
        from huggingface_hub import constants

        return once_per_filesystem(
            Path(constants.HF_HUB_CACHE), env, "model", lambda: resolve_model_path(value)
        )
    return Path(value).expanduser()


EMBEDDED_DEMO_STEPS = 10


def with_defaults(
    cfg: TrainConfig, cuda: bool, world_size: int = 1, resumed: checkpointing.TrainState | None = None
) -> tuple[TrainConfig, list[str], list[str]]:
    """(cfg, notes, problems): fill the options whose defaults depend on the device, or, on a
    resume, on the checkpoint: its --seq_len and --micro_batch, and the --grad_accum that keeps its
    global batch on this world size."""
    defaults = device_defaults(cuda)
    saved = resumed.options if resumed is not None else {}
    fill, notes, problems = {}, [], []
    for key in ("seq_len", "micro_batch"):
        if getattr(cfg, key) is None:
            fill[key] = saved.get(key) or defaults[key]
    if cfg.grad_accum is None:
        fill["grad_accum"] = defaults["grad_accum"]
        target = resumed.saved_global_batch() if resumed is not None else None
        if target is not None:
            micro = cfg.micro_batch or fill["micro_batch"]
            accum, rest = divmod(target, micro * world_size)
            if rest or accum < 1:
                problems.append(
                    f"--micro_batch/--grad_accum: the checkpoint's global batch of {target} sequences cannot be "
                    f"split into --micro_batch {micro} x {world_size} rank(s); pass --micro_batch M and "
                    f"--grad_accum A with M * A * {world_size} = {target}"
                )
            else:
                fill["grad_accum"] = accum
                if resumed.world_size != world_size:
                    notes.append(
                        f"world size {resumed.world_size} -> {world_size}: --grad_accum {accum} keeps the global "
                        f"batch of {target} sequences"
                    )
    if cfg.data is None and cfg.max_steps is None and cfg.max_tokens is None:
        fill["max_steps"] = EMBEDDED_DEMO_STEPS
    return dataclasses.replace(cfg, **fill), notes, problems


def prepare(cfg: TrainConfig, world_size: int, cuda: bool, pipeline, log=print) -> Plan:
    """Validate every option against the inputs and the checkpoint a resume continues (one
    UserError listing every problem). ``cfg.model`` must be a local directory by now; ``pipeline``
    turns ``--data`` into training rows (data.TextPipeline for cpt, chat_data.ChatPipeline for sft)."""
    problems = Problems()
    attempt = problems.attempt
    run_dir = Path(cfg.output_dir)
    resume_from = attempt(lambda: checkpointing.find_checkpoint(cfg.resume, run_dir))
    resumed = attempt(lambda: checkpointing.read_state(resume_from)) if resume_from else None
    cfg, notes, found = with_defaults(cfg, cuda, world_size, resumed)
    problems.items += found
    for name, low in (("micro_batch", 1), ("grad_accum", 1), ("seq_len", 2), ("log_every", 1)):
        if getattr(cfg, name) < low:
            problems.append(f"--{name} must be at least {low}, got {getattr(cfg, name)}")
    for name in ("max_steps", "max_tokens", "stop_at_step", "num_proc"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            problems.append(f"--{name} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"--min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0 < cfg.eval_fraction < 1:
        problems.append(f"--eval_fraction must be in (0, 1), got {cfg.eval_fraction}")
    if cfg.lr <= 0:
        problems.append(f"--lr must be positive, got {cfg.lr}")
    if cfg.dist_timeout <= 0:
        problems.append(f"--dist_timeout must be positive, got {cfg.dist_timeout}")
    if len(cfg.adam_betas) != 2:
        problems.append(f"--adam_betas takes two values, got {cfg.adam_betas}")
    raw_ds = attempt(lambda: load_ds_config(cfg.ds_config or default_ds_config(cuda)))
    if cfg.model is None:  # the launcher fills it (default_model, made once per filesystem first)
        raise ValueError("prepare() needs cfg.model")
    model_dir = attempt(lambda: resolve_model_path(cfg.model))
    reader = attempt(lambda: CheckpointReader(model_dir)) if model_dir else None
    if reader is None:
        attempt(lambda: pipeline.check_sources(cfg))  # report data problems too
        raise UserError(problems.items)
    with reader:
        config, names = reader.config, list(reader.tensors)
    data = attempt(lambda: pipeline.spec(cfg, model_dir))
    arch = attempt(lambda: architecture_for(config))
    manifest = attempt(lambda: read_manifest(model_dir))
    problems.items += context_problems(model_dir, cfg.seq_len)
    trainable = None
    if arch is not None:
        trainable = attempt(
            lambda: trainable_names(names, cfg.trainable, arch, manifest, cfg.train_embeddings)
        )
    ds = None
    if raw_ds is not None:
        ds = attempt(
            lambda: resolve_ds_config(
                raw_ds,
                micro_batch=cfg.micro_batch,
                grad_accum=cfg.grad_accum,
                world_size=world_size,
                lr=cfg.lr,
                betas=cfg.adam_betas,
                weight_decay=cfg.weight_decay,
                grad_clip=cfg.grad_clip,
                hidden_size=config.get("hidden_size", 1024),
                cuda=cuda,
                precision=cfg.precision,
                bf16_supported=cuda and torch.cuda.is_bf16_supported(),
            )
        )
    identity = checkpointing.model_identity(model_dir)
    if resumed is not None and trainable is not None and ds is not None and data is not None:
        run = checkpointing.RunIdentity(
            model_identity=identity,
            model=str(model_dir),
            trainable=trainable,
            seq_len=cfg.seq_len,
            global_batch=cfg.micro_batch * cfg.grad_accum * world_size,
            seed=cfg.seed,
            precision=precision_name(ds),
            data=data.key,
        )
        batch = f"{cfg.micro_batch} x {cfg.grad_accum} x {world_size} rank(s) = {run.global_batch}"
        conflicts = checkpointing.resume_conflicts(resumed, resume_from, run, batch, pipeline.key_options)
        problems.items += conflicts or checkpointing.damaged_files(resume_from, resumed.world_size)
    problems.raise_if_any()
    if resumed is not None and resumed.world_size != world_size:
        # DeepSpeed reads the converted checkpoint (checkpointing.universal_checkpoint) only when
        # the engine is built for it
        ds.setdefault("checkpoint", {})["load_universal"] = True
    for note in notes:
        log(note)
    return Plan(
        cfg,
        model_dir,
        arch,
        manifest,
        config,
        ds,
        trainable,
        resume_from,
        run_dir,
        identity,
        data,
        pipeline,
        world_size,
        resumed,
    )


def cache_root(plan: Plan) -> Path:
    return Path(plan.cfg.data_cache) if plan.cfg.data_cache else plan.run_dir / "data_cache"


def load_data(plan: Plan, env: DistEnv, log=print) -> PackedData:
    """The training rows, built once per filesystem that holds the cache (rank 0, or each node's
    first rank on node-local scratch) while the other ranks wait outside any collective."""
    root = cache_root(plan)
    cfg = plan.cfg

    def build() -> PackedData:
        progress = not cfg.quiet and env.is_main
        folder = plan.pipeline.build(
            plan.data, plan.model_dir, root, num_proc=cfg.num_proc, log=log, progress=progress
        )
        return plan.pipeline.open(folder, cfg.seed)

    return once_per_filesystem(root, env, "data", build)


def total_steps(cfg: TrainConfig, data: PackedData, world_size: int) -> int:
    global_batch = cfg.micro_batch * cfg.grad_accum * world_size
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.max_tokens:
        return max(1, math.ceil(cfg.max_tokens / (global_batch * cfg.seq_len)))
    return max(1, int(len(data.train) * cfg.num_epochs) // global_batch)


def param_groups(model, trainable: set[str], weight_decay: float) -> list[dict]:
    """Trainable parameters only; no decay on norms and biases (1-d tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name in trainable:
            shape = getattr(p, "ds_shape", p.shape)
            (decay if len(shape) > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def attention_implementation(ds: dict) -> str:
    """FlashAttention 2 on GPUs where it is installed and the compute dtype allows it (its varlen
    kernels run packed conversations without a mask), else PyTorch's SDPA (packed conversations get
    a block-diagonal causal mask from transformers)."""
    import importlib.util

    if (
        torch.cuda.is_available()
        and compute_dtype(ds) != torch.float32
        and importlib.util.find_spec("flash_attn")
    ):
        return "flash_attention_2"
    return "sdpa"


def load_model(source, ds: dict, activation_checkpointing: bool):
    """(model, hf_ds_config): ``source`` is a checkpoint directory, or a transformers config (random
    weights, for benchmarks). Under ZeRO-3 the weights are partitioned as they load."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # Must stay alive through from_pretrained: it makes transformers load into ZeRO-3 partitions.
    hf_ds = HfDeepSpeedConfig(ds) if ds.get("zero_optimization", {}).get("stage") == 3 else None
    kw = {"dtype": compute_dtype(ds), "attn_implementation": attention_implementation(ds)}
    with quiet_transformers(True):
        if isinstance(source, (str, Path)):
            model = AutoModelForCausalLM.from_pretrained(source, **kw)
        else:
            model = AutoModelForCausalLM.from_config(source, **kw)
    model.config.use_cache = False
    if activation_checkpointing:
        # Non-reentrant: with frozen lower layers the reentrant variant silently yields no gradient.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, hf_ds


def _input_requires_grad(module, args, kwargs):
    def mark(t):
        if torch.is_grad_enabled() and torch.is_tensor(t) and t.is_floating_point() and not t.requires_grad:
            return t.detach().requires_grad_(True)
        return t

    if args:
        return (mark(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": mark(kwargs["hidden_states"])}
    return None


def wrap_model(model, chosen: set[str], ds: dict, weight_decay: float, leaf_layers: bool = True):
    """(engine, counts): freeze all but ``chosen`` and hand only those to DeepSpeed's optimizer.

    ``leaf_layers``: ZeRO-3 fetches a whole decoder layer's parameters in one hook instead of one
    per Linear/norm (DeepSpeed's z3 leaf modules; the layer class is the model's own
    ``_no_split_modules``), which cuts the per-module hook and all-gather launches ~7x.
    """
    import deepspeed

    counts = {"trainable": 0, "total": 0}
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        numel = getattr(p, "ds_numel", p.numel())
        counts["total"] += numel
        counts["trainable"] += numel if name in chosen else 0
    if leaf_layers and ds.get("zero_optimization", {}).get("stage") == 3:
        from deepspeed.utils import set_z3_leaf_modules

        names = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if layers:
            set_z3_leaf_modules(model, list({type(m) for m in layers}))
            # A leaf layer whose input needs no gradient gets its parameters released by
            # DeepSpeed's backward hook before its own backward ran; the lowest trainable layer
            # is such a layer (everything below is frozen). Its input is made to require grad:
            # autograd still stops there, at the cost of one input gradient.
            lowest = next((m for m in layers if any(p.requires_grad for p in m.parameters())), None)
            if lowest is not None:
                lowest.register_forward_pre_hook(_input_requires_grad, with_kwargs=True)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, chosen, weight_decay), config=ds
    )
    return engine, counts


def build_engine(plan: Plan):
    """(engine, counts) for a run: the model loaded into ZeRO-3 partitions, the trainable set."""
    model, hf_ds = load_model(plan.model_dir, plan.ds_config, plan.cfg.activation_checkpointing)
    chosen = set(plan.trainable)
    names = {n for n, _ in model.named_parameters()}
    missing = sorted(chosen - names)
    if missing and not (plan.model_config.get("tie_word_embeddings") and missing == ["lm_head.weight"]):
        raise UserError(f"--trainable: the loaded model has no parameters {missing[:3]}")
    engine, counts = wrap_model(
        model, chosen, plan.ds_config, plan.cfg.weight_decay, plan.cfg.zero3_leaf_layers
    )
    engine.hf_ds_config = hf_ds  # kept with the engine for its lifetime
    return engine, counts


def fresh_state(plan: Plan, total: int) -> checkpointing.TrainState:
    return checkpointing.TrainState(
        total_steps=total,
        world_size=plan.world_size,
        model={"path": str(plan.model_dir.resolve()), "identity": plan.identity},
        trainable=plan.trainable,
        options={k: v for k, v in asdict(plan.cfg).items() if k != "local_rank"},
        global_batch=plan.global_batch,
        precision=plan.precision,
        data=plan.data.key,
    )


def layer_param_counts(plan: Plan, model) -> tuple[list[int], list[int], int]:
    """Per-layer parameter counts (all, trainable) and the output head's, for MFU."""
    n = plan.model_config["num_hidden_layers"]
    layers, trainable = [0] * n, [0] * n
    chosen = set(plan.trainable)
    for name, p in model.named_parameters():
        split = plan.arch.split_name(name)
        if split is not None:
            numel = getattr(p, "ds_numel", p.numel())
            layers[split[0]] += numel
            trainable[split[0]] += numel if name in chosen else 0
    head = plan.model_config["vocab_size"] * plan.model_config["hidden_size"]
    return layers, trainable, head
