"""``launchers/sft.py``: instruction tuning of an up-scaled model's new layers under DeepSpeed."""

from __future__ import annotations

import sys

from deus_dist.configs import SftConfig
from deus_dist.extras import requires

DESCRIPTION = """\
Instruction tuning (SFT) of the layers an up-scaling inserted, with the engine of cpt.py (DeepSpeed
ZeRO-3, checkpoints, exact resume on any world size, SIGTERM, metrics, export); only the data
differs: conversations (ShareGPT, chat messages or Alpaca records) rendered with the model's chat
template, the loss on the assistant turns only, several conversations packed per sequence.

Batch: global batch = --micro_batch * --grad_accum * world size sequences of --seq_len tokens; the
loss is the mean over every target token of the global batch. Writes RUN_DIR/metrics.jsonl,
RUN_DIR/checkpoints/step-N and RUN_DIR/final (a plain HF checkpoint carrying the chat template).
SIGTERM saves a checkpoint and exits with status 3; a finished run and --stop_at_step exit 0.
Bad input stops with exit status 2 and one message naming the option to fix.

examples:
  deepspeed --num_gpus 8 launchers/sft.py --ds_config ds_configs/zero3.json \\
      --model runs/cpt/final --data alpaca_gpt4.json --output_dir runs/sft
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/sft.py --ds_config ds_configs/zero3_cpu.json
"""


@requires("train", "sft.py")
def main(argv: list[str] | None = None) -> int:
    from deus_dist.cli.train import launcher_main
    from deus_dist.train.chat_data import ChatPipeline

    return launcher_main("sft.py", SftConfig, DESCRIPTION, ChatPipeline(), argv)


if __name__ == "__main__":
    sys.exit(main())
