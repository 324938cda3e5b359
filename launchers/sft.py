#!/usr/bin/env python
"""Instruction tuning (SFT) of an up-scaled model's inserted layers with DeepSpeed ZeRO-3.

    deepspeed [--num_gpus N] launchers/sft.py --ds_config ds_configs/zero3.json --model DIR --data PATH

The engine of cpt.py with a conversation data pipeline: formats ShareGPT / messages / Alpaca, the
model's chat template (or --chat_template), loss on assistant turns, packing. Also runs under
torchrun and srun. Global batch = --micro_batch * --grad_accum * world size. Bad input: exit status
2 with one message naming the option. See ``--help`` and the README.
"""

import sys

from deus_dist.cli.sft import main

if __name__ == "__main__":
    sys.exit(main())
