"""A training run's setup: every option validated against the inputs before any process group or
model exists, and what the options resolve to.

``validate`` checks the options (their ranges: ``TrainConfig.problems``), the model, the data, the
DeepSpeed config and the checkpoint a resume continues, and reports every problem in one UserError;
the ``TrainSetup`` it returns is what the model builder (``train/model.py``), the data and the
loop read. Options whose defaults depend on the device or on the resumed checkpoint are filled here
(``with_device_defaults``).
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
from deus_dist.checkpoint.layout import read_as_loaded
from deus_dist.checkpoint.manifest import read_manifest
from deus_dist.configs import FuseConfig, TrainConfig, device_defaults, global_batch
from deus_dist.errors import Problems, UserError
from deus_dist.train import checkpointing
from deus_dist.train.cluster import once_per_filesystem
from deus_dist.train.dist import DistEnv
from deus_dist.train.ds_config import default_ds_config, load_ds_config, precision_name, resolve_ds_config
from deus_dist.train.pipeline import DataPipeline, PackedData
from deus_dist.train.trainable import trainable_names


@dataclass
class TrainSetup:
    """A training run's options, validated against its inputs, and what they resolve to (no model
    yet): made by ``validate``, read by the model builder, the loop and the checkpoints."""

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
    pipeline: DataPipeline
    """How --data becomes training rows: data.TextPipeline (cpt) or chat_data.ChatPipeline (sft)."""
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
        return global_batch(self.cfg.micro_batch, self.cfg.grad_accum, self.world_size)

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


def with_device_defaults(
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
        micro = cfg.micro_batch if cfg.micro_batch is not None else fill["micro_batch"]
        if target is not None and micro >= 1:  # a --micro_batch below 1 is TrainConfig.problems' to report
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


def validate(cfg: TrainConfig, world_size: int, cuda: bool, pipeline: DataPipeline, log=print) -> TrainSetup:
    """Validate every option against the inputs and the checkpoint a resume continues (one
    UserError listing every problem). ``cfg.model`` must be a local directory by now; ``pipeline``
    turns ``--data`` into training rows (data.TextPipeline for cpt, chat_data.ChatPipeline for sft)."""
    problems = Problems()
    attempt = problems.attempt
    run_dir = Path(cfg.output_dir)
    resume_from = attempt(lambda: checkpointing.find_checkpoint(cfg.resume, run_dir))
    resumed = attempt(lambda: checkpointing.read_state(resume_from)) if resume_from else None
    cfg, notes, found = with_device_defaults(cfg, cuda, world_size, resumed)
    problems.items += found + cfg.problems()
    auto_ds = cfg.ds_config == "auto"  # chosen by the memory planner once the model is known
    raw_ds = None if auto_ds else attempt(lambda: load_ds_config(cfg.ds_config or default_ds_config(cuda)))
    if cfg.model is None:  # the launcher fills it (default_model, made once per filesystem first)
        raise ValueError("validate() needs cfg.model")
    model_dir = attempt(lambda: resolve_model_path(cfg.model))
    reader = attempt(lambda: CheckpointReader(model_dir)) if model_dir else None
    if reader is None:
        attempt(lambda: pipeline.check_sources(cfg))  # report data problems too
        raise UserError(problems.items)
    with reader:
        config = reader.config
        arch = attempt(lambda: architecture_for(config))
        if arch is not None:  # names as transformers loads them (train/model.py selects by them)
            attempt(lambda: read_as_loaded(reader))
        names = list(reader.tensors)
    data = attempt(lambda: pipeline.spec(cfg, model_dir))
    if arch is not None and getattr(cfg, "packing", False):
        attempt(lambda: packing_problems(model_dir))
    manifest = attempt(lambda: read_manifest(model_dir))
    problems.items += context_problems(model_dir, cfg.seq_len)
    if arch is not None and arch.experts() and not cfg.zero3_leaf_layers:
        problems.append(
            "--no_zero3_leaf_layers: a mixture-of-experts model trains with each decoder layer as a "
            "ZeRO-3 leaf (ranks routing tokens to different experts would otherwise wait on different "
            "parameter fetches); drop the flag"
        )
    trainable = None
    if arch is not None:
        trainable = attempt(
            lambda: trainable_names(names, cfg.trainable, arch, manifest, cfg.train_embeddings)
        )
    if trainable is not None and arch.experts():
        from deus_dist.checkpoint.layout import meta_model, parameters_holding

        # transformers stacks a layer's experts into one parameter: refuse part of one here,
        # before any rank loads the model
        attempt(lambda: parameters_holding(meta_model(model_dir), trainable))
    if auto_ds and trainable is not None:
        raw_ds = attempt(
            lambda: _planned_ds_config(cfg, config, trainable, world_size, cuda, notes, resume_from)
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
                hidden_size=(arch.config_value(config, "hidden_size") if arch else None) or 1024,
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
            global_batch=global_batch(cfg.micro_batch, cfg.grad_accum, world_size),
            seed=cfg.seed,
            precision=precision_name(ds),
            data=data.key,
        )
        batch = f"{cfg.micro_batch} x {cfg.grad_accum} x {world_size} rank(s) = {run.global_batch}"
        conflicts = checkpointing.resume_conflicts(resumed, resume_from, run, batch, pipeline.key_options)
        conflicts += checkpointing.sharding_conflicts(resume_from, ds)
        problems.items += conflicts or checkpointing.damaged_files(resume_from, resumed.world_size)
    problems.raise_if_any()
    if resumed is not None and resumed.world_size != world_size:
        # DeepSpeed reads the converted checkpoint (checkpointing.universal_checkpoint) only when
        # the engine is built for it
        ds.setdefault("checkpoint", {})["load_universal"] = True
    for note in notes:
        log(note)
    return TrainSetup(
        cfg=cfg,
        model_dir=model_dir,
        arch=arch,
        manifest=manifest,
        model_config=config,
        ds_config=ds,
        trainable=trainable,
        resume_from=resume_from,
        run_dir=run_dir,
        identity=identity,
        data=data,
        pipeline=pipeline,
        world_size=world_size,
        resumed=resumed,
    )


def packing_problems(model_dir: Path) -> None:
    """--packing for a model with recurrent layers needs the kernels that restart their state at
    every packed conversation (train.model.model_inputs); without them the state would run on from
    one conversation into the next."""
    from transformers import AutoConfig

    from deus_dist.hf_logging import quiet_transformers
    from deus_dist.train.model import missing_packed_sequence_kernels, recurrent_layers

    with quiet_transformers(True):
        config = AutoConfig.from_pretrained(model_dir)
    missing = missing_packed_sequence_kernels() if recurrent_layers(config) else []
    if missing:
        raise UserError(
            f"--packing: this {config.model_type} model has recurrent (state-space) layers, which "
            f"keep packed conversations apart only with the {' and '.join(missing)} kernels (GPU; not "
            "installed here): install them, or use --no_packing (one conversation per row)"
        )


def _planned_ds_config(
    cfg: TrainConfig, config: dict, trainable, world_size: int, cuda: bool, notes, resume_from
) -> dict:
    """``--ds_config auto``: the shipped config train/memory_plan.py recommends (its reason noted);
    a resume chooses among the configs that read its checkpoint (ZeRO-3, or ZeRO-1/2)."""
    from deus_dist.train.memory_plan import auto_ds_config

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    path, why = auto_ds_config(
        config,
        set(trainable),
        run_shape(cfg, world_size, "bf16" if bf16 else "fp32"),
        cuda=cuda,
        zero3=checkpointing.partitioned_model_states(resume_from) if resume_from else None,
    )
    notes.append(why)
    return load_ds_config(path)


def run_shape(cfg: TrainConfig, world_size: int, precision: str):
    """What the memory planner (train/memory_plan.py) sizes of a launch: one node of
    ``world_size`` ranks with these options."""
    from deus_dist.train.memory_plan import RunShape

    return RunShape(
        gpus_per_node=world_size,
        nodes=1,
        seq_len=cfg.seq_len,
        micro_batch=cfg.micro_batch,
        grad_accum=cfg.grad_accum,
        precision=precision,
        activation_checkpointing=cfg.activation_checkpointing,
    )


def planned_memory(setup: TrainSetup, device: str, log=print):
    """train/memory_plan.py's per-device plan for this run as launched (its model, trainable
    tensors, world size and resolved DeepSpeed config), logged with its parts; the loop records
    its peak beside the measured one. None, with the reason logged, for a config it does not size."""
    from deus_dist.train.memory_plan import PART_LABELS, GiB, plan_run

    try:
        run = run_shape(setup.cfg, setup.world_size, setup.precision)
        plan = plan_run(setup.model_config, set(setup.trainable), run, setup.ds_config)
    except UserError as e:
        log(f"memory plan: none ({e})")
        return None
    parts = ", ".join(f"{label} {plan.parts[key] / GiB:.2f}" for key, label in PART_LABELS.items())
    log(
        f"memory plan ({plan.name}): {plan.peak / GiB:.2f} GiB per {device} at peak ({parts} GiB); "
        "metrics.jsonl records it as planned_memory_gb beside the measured peak_memory_gb"
    )
    if plan.note:
        log(f"memory plan: {plan.note}")
    return plan


def cache_root(setup: TrainSetup) -> Path:
    return Path(setup.cfg.data_cache) if setup.cfg.data_cache else setup.run_dir / "data_cache"


def load_data(setup: TrainSetup, env: DistEnv, log=print) -> PackedData:
    """The training rows, built once per filesystem that holds the cache (rank 0, or each node's
    first rank on node-local scratch) while the other ranks wait outside any collective."""
    root = cache_root(setup)
    cfg = setup.cfg

    def build() -> PackedData:
        progress = not cfg.quiet and env.is_main
        folder = setup.pipeline.build(
            setup.data, setup.model_dir, root, num_proc=cfg.num_proc, log=log, progress=progress
        )
        return setup.pipeline.open(folder, cfg.seed)

    return once_per_filesystem(root, env, "data", build)


def total_steps(setup: TrainSetup, data: PackedData) -> int:
    """The schedule's length: --max_steps, else --max_tokens in whole steps, else --num_epochs."""
    cfg, batch = setup.cfg, setup.global_batch
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.max_tokens:
        return max(1, math.ceil(cfg.max_tokens / (batch * cfg.seq_len)))
    return max(1, int(len(data.train) * cfg.num_epochs) // batch)


def fresh_state(setup: TrainSetup, total: int) -> checkpointing.TrainState:
    return checkpointing.TrainState(
        total_steps=total,
        world_size=setup.world_size,
        model={"path": str(setup.model_dir.resolve()), "identity": setup.identity},
        trainable=setup.trainable,
        options={k: v for k, v in asdict(setup.cfg).items() if k != "local_rank"},
        global_batch=setup.global_batch,
        precision=setup.precision,
        data=setup.data.key,
    )
