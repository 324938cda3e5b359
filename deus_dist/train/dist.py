"""Process-group set-up for every launcher: deepspeed, torchrun, srun, or a plain ``python``.

The rank layout is read from the environment: ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (deepspeed and
torchrun set them), else SLURM's ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` (one task per
GPU under ``srun``), else a single process. The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from deus_dist.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        ).stdout
        return out.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]


def layout(local_rank_flag: int | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's variables, SLURM's, or a single process.
    Reads the environment only."""
    env = os.environ
    if "RANK" in env:
        rank, world = int(env["RANK"]), int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
    else:
        rank, local, world = 0, 0, 1
    if local_rank_flag is not None:
        local = local_rank_flag
    return rank, local, world


def _export_layout(rank: int, local_rank: int, world_size: int) -> None:
    """The variables torch.distributed's env:// initialisation reads."""
    env = os.environ
    env.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    if "SLURM_PROCID" in env and world_size > 1:
        env.setdefault("MASTER_ADDR", _slurm_master())
        env.setdefault("MASTER_PORT", "29500")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(local_rank_flag: int | None = None) -> DistEnv:
    """Start the process group (idempotent) and pick this rank's device."""
    rank, local_rank, world_size = layout(local_rank_flag)
    _export_layout(rank, local_rank, world_size)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                "start at most one process per GPU (--num_gpus / --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistEnv(rank, local_rank, world_size, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main_first(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first (it builds a cache), then on the others (they read it).

    A UserError on rank 0 is sent to every rank and raised there too, so no rank waits forever on
    a peer that has stopped.
    """
    if env.world_size == 1:
        return fn()
    failure: list = [None]
    result = None
    error: Exception | None = None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # any failure must reach the other ranks, or they wait forever
            error = e
            failure = [e.problems if isinstance(e, UserError) else f"rank 0 failed: {e!r}"]
    torch.distributed.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise UserError(failure[0]) if isinstance(failure[0], list) else RuntimeError(failure[0])
    if not env.is_main:
        result = fn()
    return result


def all_mean(value: float, env: DistEnv) -> float:
    """Mean of a float over ranks."""
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(t)
    return t.item() / env.world_size


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if env.world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=env.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
