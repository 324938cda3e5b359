#!/usr/bin/env python
"""Continual pre-training of an up-scaled model's inserted layers with DeepSpeed ZeRO-3.

    deepspeed [--num_gpus N] launchers/cpt.py --ds_config ds_configs/zero3.json --model DIR --data PATH

Also runs under torchrun and srun. Global batch = --micro_batch * --grad_accum * world size.
Bad input: exit status 2 with one message naming the option. See ``--help`` and the README.
"""

import sys

from deus_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
