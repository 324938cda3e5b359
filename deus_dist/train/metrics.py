"""Rank 0's record of a run: ``metrics.jsonl`` (one object per optimizer step), stdout, TensorBoard.

MFU counts the useful matmul FLOPs of a step with frozen layers: the forward of every layer and
the head; the backward's input gradients only from the lowest trainable layer up (autograd stops
below it); weight gradients only for trainable parameters; attention scores and the weighted sum
of values included, halved for the causal mask (a token attends to the positions before it: on
average half the sequence). Peak FLOPs are known for a few GPUs (dense bf16); elsewhere MFU is
left out.
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


def flops_per_token(
    *,
    layer_params: list[int],
    trainable_layer_params: list[int],
    head_params: int,
    hidden: int,
    seq_len: int,
    embeddings_train: bool,
) -> float:
    """Matmul FLOPs per trained token of one forward + backward (see the module docstring)."""
    n_layers = len(layer_params)
    # scores (QK^T) and weighted values (AV), per layer per token, forward: 2 * 2 * seq * hidden
    # over the full square, half of it under the causal mask
    attn = 2 * seq_len * hidden
    forward = sum(2 * p + attn for p in layer_params) + 2 * head_params
    trainable_layers = [i for i, p in enumerate(trainable_layer_params) if p]
    lowest = 0 if embeddings_train else (min(trainable_layers) if trainable_layers else n_layers)
    input_grads = sum(2 * p + 2 * attn for p in layer_params[lowest:]) + 2 * head_params
    weight_grads = 2 * sum(trainable_layer_params) + (2 * head_params if embeddings_train else 0)
    return float(forward + input_grads + weight_grads)


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
    if r.get("grad_norm") is not None:
        parts.append(f"grad {r['grad_norm']:.3f}")
    parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "eval_loss" in r:
        parts.append(f"eval loss {r['eval_loss']:.4f} ppl {r['eval_ppl']:.2f}")
    return "  ".join(parts)
