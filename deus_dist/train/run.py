"""A training run from options to export: the part every launcher shares (cpt; sft reuses it).

``start`` brings a run up to its first step: process group; the checks no rank can make alone
(shared --output_dir); the model (made or downloaded once per filesystem); every option validated
against the inputs and the checkpoint a resume continues; the data packed once per filesystem; a
checkpoint from another world size converted to DeepSpeed's universal format; the ZeRO-3 engine;
the restored state. ``train_and_export`` runs the loop and writes ``RUN_DIR/final``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deus_dist.configs import TrainConfig
from deus_dist.errors import UserError

if TYPE_CHECKING:  # the runtime imports wait for start(): torch and DeepSpeed load slowly
    from deus_dist.train.checkpointing import TrainState
    from deus_dist.train.dist import DistEnv
    from deus_dist.train.pipeline import DataPipeline, PackedData
    from deus_dist.train.setup import TrainSetup

STOPPED_BY_SIGNAL = 3
"""Exit status of a run a signal stopped early, after a complete checkpoint (SLURM requeues on it)."""


def quiet_known_warnings() -> None:
    """DeepSpeed 0.19 calls collectives torch marks deprecated, and its ZeRO-3 module hooks trip
    torch's full-backward-hook notice on frozen inputs; both repeat on every rank and mean nothing
    to a user of the launchers."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    warnings.filterwarnings("ignore", message=r"Full backward hook is firing when gradients are computed")


@dataclass
class Run:
    """A run brought up to its first step on this rank."""

    env: DistEnv
    setup: TrainSetup
    """The validated options and what they resolve to."""
    data: PackedData
    engine: Any
    """DeepSpeed's engine around the model."""
    counts: dict
    """Parameter counts: trainable and total."""
    state: TrainState
    """Restored on a resume."""
    say: Callable[..., None]
    """``log`` on rank 0, nothing elsewhere."""
    planned_memory_gb: float | None = None
    """The memory planner's per-device peak for this run (``setup.planned_memory``), in GB."""


def start(cfg: TrainConfig, pipeline: DataPipeline | None = None, log=print) -> Run:
    """``pipeline``: how --data becomes training rows (default: cpt's data.TextPipeline)."""
    import torch

    quiet_known_warnings()
    from deus_dist.train import checkpointing
    from deus_dist.train import setup as run_setup
    from deus_dist.train.cluster import once_per_filesystem, require_shared
    from deus_dist.train.dist import init_distributed, keep_freed_cpu_memory
    from deus_dist.train.model import build_engine

    _check_outputs(cfg)  # before anything is written: require_shared makes --output_dir
    cuda = torch.cuda.is_available()
    env = init_distributed(cfg.local_rank, cfg.dist_timeout)
    if not cuda:
        keep_freed_cpu_memory()
    say = log if env.is_main else (lambda *a, **k: None)
    require_shared(Path(cfg.output_dir), env, "--output_dir")
    cfg = dataclasses.replace(cfg, model=str(run_setup.resolve_model(cfg.model, env, say)))
    if pipeline is None:
        from deus_dist.train.data import TextPipeline

        pipeline = TextPipeline()
    setup = run_setup.validate(cfg, env.world_size, cuda, pipeline, log=say)
    cfg = setup.cfg
    planned = run_setup.planned_memory(setup, "GPU" if cuda else "rank", say)
    data = run_setup.load_data(setup, env, log=say)
    if len(data.eval) < env.world_size:
        raise UserError(
            f"--eval_fraction/--eval_data: {len(data.eval)} held-out blocks for {env.world_size} ranks; "
            "hold out more text"
        )
    if setup.convert:  # another world size wrote it: DeepSpeed's universal format, made once
        once_per_filesystem(
            setup.resume_from,
            env,
            "universal",
            lambda: checkpointing.universal_checkpoint(setup.resume_from, say),
        )
    eng, counts = build_engine(setup)
    total = run_setup.total_steps(setup, data)
    state = run_setup.fresh_state(setup, total)
    if setup.resume_from is not None:
        state = checkpointing.load(eng, env, setup.resume_from, universal=setup.convert)
        say(f"resumed from {setup.resume_from} at step {state.step} (data position {state.consumed})")
        state.world_size, state.global_batch, state.precision = (
            env.world_size,
            setup.global_batch,
            setup.precision,
        )
        if state.total_steps != total:  # --max_steps/--max_tokens changed: the new length wins
            say(f"schedule length changed from {state.total_steps} to {total} steps")
            state.total_steps = total
    say(
        f"model {setup.model_dir}: {counts['trainable']:,} of {counts['total']:,} parameters train "
        f"({len(setup.trainable)} tensors, --trainable {cfg.trainable}); {env.world_size} rank(s) on "
        f"{env.device.type} in {setup.precision}; {len(data.train)} training blocks of {cfg.seq_len} tokens; "
        f"global batch {setup.global_batch} ({cfg.micro_batch} x {cfg.grad_accum} x {env.world_size}); {total} steps"
    )
    if counts.get("zero3_leaves"):
        say(f"ZeRO-3 leaf modules (one parameter fetch per layer): {', '.join(counts['zero3_leaves'])}")
    return Run(
        env=env,
        setup=setup,
        data=data,
        engine=eng,
        counts=counts,
        state=state,
        say=say,
        planned_memory_gb=planned.peak / 1e9 if planned else None,
    )


def _check_outputs(cfg: TrainConfig) -> None:
    from deus_dist.outputs import Input, output_problems

    inputs = [Input("--model", cfg.model), Input("--data", cfg.data), Input("--eval_data", cfg.eval_data)]
    problems = output_problems(cfg.output_dir, "--output_dir", "dir", inputs)
    if cfg.data_cache:
        problems += output_problems(cfg.data_cache, "--data_cache", "dir", inputs)
    if problems:
        raise UserError(problems)


def train_and_export(run: Run, log=print):
    """The loop, then ``RUN_DIR/final`` when the schedule finished; returns the loop's Outcome."""
    from deus_dist.train import checkpointing, loop
    from deus_dist.train.accounting import trained_flops_per_token
    from deus_dist.train.cluster import main_then_others
    from deus_dist.train.export import export_checkpoint
    from deus_dist.train.metrics import peak_flops

    setup, env, say, cfg = run.setup, run.env, run.say, run.setup.cfg
    fpt = trained_flops_per_token(setup, run.engine.module)
    outcome = loop.train(
        run.engine,
        run.data,
        cfg,
        env,
        run.state,
        setup.run_dir,
        fpt,
        peak_flops(env.device),
        planned_memory_gb=run.planned_memory_gb,
    )
    if outcome.stopped_early:
        why = "on a signal" if outcome.signalled else f"at --stop_at_step {cfg.stop_at_step}"
        say(
            f"stopped {why} after step {outcome.state.step}; checkpoint {outcome.last_checkpoint}; "
            "run the same command again to resume"
        )
        return outcome
    if cfg.export:
        ckpt = (
            outcome.last_checkpoint or checkpointing.complete_checkpoints(setup.run_dir / "checkpoints")[-1]
        )
        # Rank 0 exports while the others wait for it without a collective deadline, so every task
        # of a job ends together (srun ends a step when its first task ends, after --wait).
        main_then_others(
            setup.run_dir,
            env,
            "export",
            lambda: export_checkpoint(
                ckpt,
                setup.run_dir / "final",
                force=True,
                extra_files=setup.pipeline.export_files(setup.data),
                log=say,
            ),
        )
    return outcome
