"""Shared parts of the stand-in sbatch, srun and scontrol (see README.md)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

STATE = Path(os.environ.get("SLURM_STANDIN_DIR", "/tmp/slurm-standin"))


def event(*words) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "events.log", "a") as f:
        f.write(f"{time.time():.3f} " + " ".join(str(w) for w in words) + "\n")


def expand_nodelist(text: str) -> list[str]:
    """node[0-2],x -> node0 node1 node2 x (enough of SLURM's host list syntax for the stand-in)."""
    names = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text):
        m = re.match(r"^(.*)\[(.*)\]$", part)
        if not m:
            names.append(part)
            continue
        prefix, ranges = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{str(i).zfill(len(lo))}")
    return names
