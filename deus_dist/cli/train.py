"""``launchers/cpt.py``: continual pre-training of an up-scaled model's new layers under DeepSpeed."""

from __future__ import annotations

import dataclasses
import sys

from deus_dist.cli.args import parse_config
from deus_dist.configs import TrainConfig
from deus_dist.errors import UserError

DESCRIPTION = """\
Continual pre-training of the layers an up-scaling inserted (the manifest's new_layers), with
DeepSpeed ZeRO-3, on one GPU, many nodes, or 2 CPU processes.

Batch: global batch = --micro_batch * --grad_accum * world size sequences of --seq_len tokens;
the DeepSpeed JSON's "auto" values are filled from these options (explicit values must agree).
Writes RUN_DIR/metrics.jsonl (one JSON object per optimizer step), RUN_DIR/checkpoints/step-N
(trainable weights, optimizer, data position, RNG), and RUN_DIR/final (a plain HF checkpoint).
SIGTERM saves a checkpoint and exits 0; run the same command again to resume (--resume auto).
Bad input stops with exit status 2 and one message naming the option to fix.

examples:
  deepspeed --num_gpus 8 launchers/cpt.py --ds_config ds_configs/zero3.json \\
      --model upscaled/Llama-3.2-1B-opt-deus-24L --data corpus/ --output_dir runs/1b
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/cpt.py --ds_config ds_configs/zero3_cpu.json \\
      --seq_len 256 --micro_batch 2 --grad_accum 2 --max_steps 10
  torchrun --nproc_per_node 2 launchers/cpt.py --model DIR --data data.jsonl --trainable all
"""


def _quiet_known_warnings() -> None:
    """DeepSpeed 0.19 calls collectives torch marks deprecated, and its ZeRO-3 module hooks trip
    torch's full-backward-hook notice on frozen inputs; both repeat on every rank and mean nothing
    to a user of this launcher."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    warnings.filterwarnings("ignore", message=r"Full backward hook is firing when gradients are computed")


def run(cfg: TrainConfig, log=print) -> int:
    import torch

    _quiet_known_warnings()
    from deus_dist.train import checkpointing, engine, loop
    from deus_dist.train.dist import DistEnv, init_distributed, layout, main_first
    from deus_dist.train.export import export_checkpoint
    from deus_dist.train.metrics import flops_per_token, peak_flops

    cfg = engine.with_defaults(cfg, torch.cuda.is_available())
    rank, _, world_size = layout(cfg.local_rank)
    say = log if rank == 0 else (lambda *a, **k: None)
    env: DistEnv | None = None
    if cfg.model is None:  # rank 0 makes the default up-scaled model; the others wait for it
        env = init_distributed(cfg.local_rank)
        cfg = dataclasses.replace(cfg, model=str(main_first(env, lambda: engine.default_model(say))))
    # Every option is checked before any process group exists (with --model given).
    plan = engine.prepare(cfg, world_size, torch.cuda.is_available(), log=say)
    env = env or init_distributed(cfg.local_rank)
    data = engine.load_data(plan, env, log=say)
    if len(data.eval) < env.world_size:
        raise UserError(
            f"--eval_fraction/--eval_data: {len(data.eval)} held-out blocks for {env.world_size} ranks; "
            "hold out more text"
        )
    eng, counts = engine.build_engine(plan)
    total = engine.total_steps(cfg, data, env.world_size)
    state = engine.fresh_state(plan, total, env.world_size)
    if plan.resume_from is not None:
        state = checkpointing.load(eng, env, plan.resume_from)
        say(f"resumed from {plan.resume_from} at step {state.step} (data position {state.consumed})")
        if state.total_steps != total:  # --max_steps/--max_tokens changed: the new length wins
            say(f"schedule length changed from {state.total_steps} to {total} steps")
            state.total_steps = total
    say(
        f"model {plan.model_dir}: {counts['trainable']:,} of {counts['total']:,} parameters train "
        f"({len(plan.trainable)} tensors, --trainable {cfg.trainable}); {env.world_size} rank(s) on "
        f"{env.device.type}; {len(data.train)} training blocks of {cfg.seq_len} tokens; "
        f"global batch {cfg.micro_batch * cfg.grad_accum * env.world_size}; {total} steps"
    )
    layers, trainable, head = engine.layer_param_counts(plan, eng.module)
    fpt = flops_per_token(
        layer_params=layers,
        trainable_layer_params=trainable,
        head_params=head,
        hidden=plan.model_config["hidden_size"],
        seq_len=cfg.seq_len,
        embeddings_train=any(n in plan.arch.embeddings for n in plan.trainable),
    )
    outcome = loop.train(eng, data, cfg, env, state, plan.run_dir, fpt, peak_flops(env.device))
    if outcome.stopped_early:
        say(
            f"stopped after step {outcome.state.step}; checkpoint {outcome.last_checkpoint}; "
            "run the same command again to resume"
        )
        return 0
    if cfg.export and env.is_main:  # no collective: the other ranks are done and may exit
        ckpt = outcome.last_checkpoint or checkpointing.complete_checkpoints(plan.run_dir / "checkpoints")[-1]
        export_checkpoint(ckpt, plan.run_dir / "final", force=True, log=say)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_config(TrainConfig, argv, "cpt.py", DESCRIPTION))
    except UserError as e:
        from deus_dist.train.dist import layout

        if layout()[0] == 0:  # every rank finds the same problems; one prints them
            print(f"cpt.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
