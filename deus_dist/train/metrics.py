"""Rank 0's record of a run: ``metrics.jsonl`` (one object per optimizer step), stdout, TensorBoard.

MFU is tokens per second x ``deus_dist.flops.flops_per_token`` over the devices' peak FLOPs. Peak
FLOPs are known for a few GPUs (dense bf16); elsewhere MFU is left out.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from deus_dist.errors import UserError

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gb(device) -> float:
    """This rank's peak memory so far: allocated GPU memory on CUDA, the process's peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run continues the file: records past the checkpoint (written before a kill)
        # are dropped so every step appears once.
        kept = [r for r in self._records() if r[1].get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line, _ in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.tb = None

    def _records(self) -> list[tuple[str, dict]]:
        """(line, record) for each line of the file. A kill during an append leaves a half-written
        last line: it is dropped with a warning. A bad line before the last is not a torn append
        but damage, refused so nothing is rewritten on a guess."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                if number == len(lines):
                    print(
                        f"warning: {self.path}: dropped a half-written last line (a run killed while "
                        f"appending): {line[:80]!r}",
                        file=sys.stderr,
                    )
                    continue
                raise UserError(
                    f"--output_dir: {self.path} line {number} is not JSON ({e}); repair or remove that line, "
                    "or start a new run in another --output_dir"
                ) from None
            records.append((line, record))
        return records

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_record(r: dict, total: int) -> str:
    parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    if "aux_loss" in r:
        parts.append(f"router aux {r['aux_loss']:.4f}")
    if r.get("grad_norm") is not None:
        parts.append(f"grad {r['grad_norm']:.3f}")
    parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "eval_loss" in r:
        parts.append(f"eval loss {r['eval_loss']:.4f} ppl {r['eval_ppl']:.2f}")
    return "  ".join(parts)
