"""``tools/fuse_layers.py``: parse, validate, run, report."""

from __future__ import annotations

import signal
import sys

from deus_dist.cli.args import parse_config
from deus_dist.configs import FuseConfig
from deus_dist.errors import UserError

DESCRIPTION = """\
Make a pretrained decoder-only model deeper: new blocks built from adjacent pretrained blocks are
inserted (by default into the top half's gaps), and an up-scaled sharded checkpoint is written
with deus_manifest.json naming the new layers. Reads and writes one tensor at a time; the output
is written under a temporary name and renamed only when complete and verified.

examples:
  python tools/fuse_layers.py                       # the embedded SmolLM2-135M, 30 -> 45 layers
  python tools/fuse_layers.py --model DIR --out OUT --method llama-pro --num_new 8
  python tools/fuse_layers.py --model DIR --positions 10,12,14 --dtype bf16
"""


def _sigterm_to_exit(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the cleanup of the temporary directory


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    try:
        cfg = parse_config(FuseConfig, argv, "fuse_layers.py", DESCRIPTION)
        from deus_dist.upscale import run
        from deus_dist.workers import distributed_world

        run(cfg, world=distributed_world())
    except UserError as e:
        print(f"fuse_layers.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fuse_layers.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
