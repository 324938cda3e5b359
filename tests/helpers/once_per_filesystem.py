"""Launched with torchrun on 4 ranks as 2 "nodes" x 2 (``once_per_filesystem.py ROOT``): exercises
deus_dist.train.cluster with a process-group timeout of 2 seconds, and writes what each rank saw to
ROOT/rank-R.json.

- shared: one directory every rank sees -> built once, by rank 0;
- node-local: ROOT/node-N for ranks 2N and 2N+1 (each "node" has its own scratch) -> built once per
  node, by ranks 0 and 2;
- slow: a build of 6 s, three times the collective timeout, still succeeds everywhere;
- failing: the builder's UserError reaches every rank with its message;
- require_shared: node-local directories are refused, naming the option.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from deus_dist.errors import UserError  # noqa: E402
from deus_dist.train.cluster import once_per_filesystem, require_shared  # noqa: E402
from deus_dist.train.dist import init_distributed  # noqa: E402

root = Path(sys.argv[1])
env = init_distributed(timeout_s=2.0)
node = env.rank // 2
report = {"rank": env.rank, "built": []}


def build(name, seconds=0.0):
    def fn():
        target = root / name / "built-by"
        if not target.exists():  # idempotent: the waiting ranks find it
            time.sleep(seconds)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(str(env.rank))
            report["built"].append(name)
        return target.read_text()

    return fn


report["shared"] = once_per_filesystem(root / "shared", env, "shared", build("shared"))
local = root / f"node-{node}"
report["local"] = once_per_filesystem(local, env, "local", build(f"node-{node}"))
report["slow"] = once_per_filesystem(root / "slow", env, "slow", build("slow", seconds=6.0))


def fail():
    raise UserError("--data: the builder could not read corpus.jsonl")


try:
    once_per_filesystem(root / "fail", env, "fail", fail)
except UserError as e:
    report["failure"] = {"message": str(e), "reported_by_me": e.reported_by(env.rank)}
try:
    require_shared(local, env, "--output_dir")
    report["local_shared"] = None
except UserError as e:
    report["local_shared"] = str(e)
(root / f"rank-{env.rank}.json").write_text(json.dumps(report))
# close the group as the launchers do: with a 2 s timeout, a rank that leaves it open can abort at exit
# (gloo: "terminate called without an active exception") while the others are already gone
torch.distributed.destroy_process_group()
# Leave without the interpreter's teardown. CI saw ranks of these helpers abort at exit ("terminate
# called without an active exception") twice, never reproduced here: gloo objects that outlive
# destroy_process_group (DeepSpeed keeps its groups) are destroyed there, after a peer may be gone.
# Everything the helper writes is closed by now.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
