"""``launchers/cpt.py``: continual pre-training of an up-scaled model's new layers under DeepSpeed."""

from __future__ import annotations

import sys

from deus_dist.cli.args import parse_config
from deus_dist.configs import TrainConfig
from deus_dist.errors import UserError
from deus_dist.extras import requires

DESCRIPTION = """\
Continual pre-training of the layers an up-scaling inserted (the manifest's new_layers), with
DeepSpeed ZeRO-3, on one GPU, many nodes, or 2 CPU processes.

Batch: global batch = --micro_batch * --grad_accum * world size sequences of --seq_len tokens;
the DeepSpeed JSON's "auto" values are filled from these options (explicit values must agree).
Writes RUN_DIR/metrics.jsonl (one JSON object per optimizer step), RUN_DIR/checkpoints/step-N
(trainable weights, optimizer, data position, RNG), and RUN_DIR/final (a plain HF checkpoint).
SIGTERM (or SIGUSR1) saves a checkpoint and exits with status 3 (SLURM batch scripts requeue on it);
a finished run and --stop_at_step exit 0. Run the same command again to resume (--resume auto), on
any number of ranks (the global batch is kept).
Bad input stops with exit status 2 and one message naming the option to fix.

examples:
  deepspeed --num_gpus 8 launchers/cpt.py --ds_config ds_configs/zero3.json \\
      --model upscaled/Llama-3.2-1B-opt-deus-24L --data corpus/ --output_dir runs/1b
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/cpt.py --ds_config ds_configs/zero3_cpu.json \\
      --seq_len 256 --micro_batch 2 --grad_accum 2 --max_steps 10
  torchrun --nproc_per_node 2 launchers/cpt.py --model DIR --data data.jsonl --trainable all
"""


def run(cfg, pipeline=None, log=print) -> int:
    """Train, export; the exit status: 0 when finished (or at --stop_at_step), 3 when a signal stopped
    the run after a complete checkpoint."""
    from deus_dist.train.run import STOPPED_BY_SIGNAL, start, train_and_export

    outcome = train_and_export(start(cfg, pipeline, log=log), log=log)
    return STOPPED_BY_SIGNAL if outcome.signalled else 0


def launcher_main(prog: str, cls: type, description: str, pipeline, argv: list[str] | None) -> int:
    """``main`` of a training launcher (cpt.py, sft.py): bad input exits 2 with one message, printed
    by the rank that found it, prefixed with its rank and host (by rank 0 alone when every rank
    found it); a rank that another rank's error stopped exits 2 without a word. The process group
    is always closed (train/failures.py)."""
    board = None
    try:
        return run(parse_config(cls, argv, prog, description), pipeline)
    except UserError as e:
        from deus_dist.train import failures
        from deus_dist.train.dist import layout

        board = failures.FailureBoard.of_job()
        failures.report(e, prog, board, layout()[0])
        return 2
    except Exception:
        from deus_dist.train import failures

        board = failures.FailureBoard.of_job()
        if not failures.stopped_by_another_rank(board):
            board = None  # nobody posted: no rank needs the store kept alive
            raise
        return 2
    finally:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a peer still in a collective fails now
        if board is not None:
            board.leave()


@requires("train", "cpt.py")
def main(argv: list[str] | None = None) -> int:
    return launcher_main("cpt.py", TrainConfig, DESCRIPTION, None, argv)


if __name__ == "__main__":
    sys.exit(main())
