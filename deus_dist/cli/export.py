"""``tools/export_hf.py``: a training checkpoint -> a plain HF checkpoint."""

from __future__ import annotations

import argparse
import sys

from deus_dist.errors import UserError
from deus_dist.extras import requires

DESCRIPTION = """\
Turn a training checkpoint (RUN_DIR/checkpoints, or one step-N inside it) into a plain HF checkpoint:
sharded safetensors, config, tokenizer, and the manifest extended with the training run. Trained
tensors are gathered from every rank's partition and cast to the input checkpoint's dtype; all
other tensors are copied byte for byte from the checkpoint training started from. OUT_DIR is
written under a temporary name and renamed when complete.

examples:
  python tools/export_hf.py runs/cpt/checkpoints runs/cpt/export
  python tools/export_hf.py runs/cpt/checkpoints/step-00000200 out/ --base upscaled/moved-here
"""


@requires("train", "export_hf.py")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="export_hf.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint_dir", metavar="CHECKPOINT_DIR", help="RUN_DIR/checkpoints or a step-N in it"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Where the HF checkpoint is written.")
    parser.add_argument(
        "--base", help="The checkpoint training started from, if it moved (default: the path recorded)."
    )
    parser.add_argument("--shard_size", default="5GB", help="Largest output shard (default: 5GB).")
    parser.add_argument("--force", action="store_true", help="Replace an existing OUT_DIR.")
    args = parser.parse_args(argv)
    try:
        from pathlib import Path

        from deus_dist.train.export import export_checkpoint

        if not Path(args.checkpoint_dir).exists():
            raise UserError(f"CHECKPOINT_DIR: {args.checkpoint_dir} does not exist")
        export_checkpoint(
            args.checkpoint_dir, args.out_dir, base=args.base, force=args.force, shard_size=args.shard_size
        )
    except UserError as e:
        print(f"export_hf.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
