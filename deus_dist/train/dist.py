"""Process-group set-up for every launcher: deepspeed, torchrun, srun, or a plain ``python``.

The rank layout is read from the environment: ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (deepspeed and
torchrun set them), else SLURM's ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_STEP_NUM_TASKS`` in a
task that ``srun`` started (one task per GPU), else a single process. The batch script of an
allocation also carries ``SLURM_PROCID`` and ``SLURM_NTASKS``, but only ``srun`` tasks have the step
variables: a plain ``python`` there is one process, never rank 0 of peers that will not come.
The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from deus_dist.errors import UserError
from deus_dist.ports import free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    nonce: str = ""
    """The same random string on every rank of this run (rank 0's, broadcast at start-up): names
    the run's marker files so they never match a file an earlier run left."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
    elif "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
    else:
        rank, local, world = 0, 0, 1
    if local_rank_flag is not None:
        local = local_rank_flag
    return rank, local, world


def slurm_master_port(job_id: str) -> int:
    """A port every task of one SLURM job derives alike and two jobs on one node do not share
    (a fixed 29500 collides as soon as two jobs land on the same node)."""
    return 20000 + int(job_id) % 40000


def _export_layout(rank: int, local_rank: int, world_size: int) -> None:
    """The variables torch.distributed's env:// initialisation reads."""
    env = os.environ
    env.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    if "SLURM_STEP_NUM_TASKS" in env and world_size > 1:
        env.setdefault("MASTER_ADDR", _slurm_master())
        if env.get("SLURM_JOB_ID", "").isdigit():
            env.setdefault("MASTER_PORT", str(slurm_master_port(env["SLURM_JOB_ID"])))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def cuda_device_index(local_rank: int, visible: int) -> int:
    """Which of the ``visible`` GPUs this process drives.

    One per local rank where a node's processes all see every GPU (deepspeed, torchrun, srun with
    --gpus-per-node); GPU 0 where each process sees only its own (srun --gpus-per-task=1, or
    CUDA_VISIBLE_DEVICES set per task).
    """
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise UserError(
        f"local rank {local_rank} but only {visible} GPU(s) visible to this process: start at most one "
        "process per GPU (--num_gpus / --nproc_per_node / --ntasks-per-node), or give each task its own "
        "GPU (srun --gpus-per-task=1)"
    )


def init_distributed(local_rank_flag: int | None = None, timeout_s: float | None = None) -> DistEnv:
    """Start the process group (idempotent) and pick this rank's device.

    ``timeout_s`` bounds how long a collective waits for its peers (torch's default: 10 minutes);
    nothing long-running (data preparation, up-scaling, downloads) happens inside a collective, so
    it only needs to cover one training step and a checkpoint.
    """
    import datetime

    rank, local_rank, world_size = layout(local_rank_flag)
    _export_layout(rank, local_rank, world_size)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.distributed.is_initialized():
        # joined before the GPU is chosen: a rank without one reports it to the others (failures.py)
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False, **kwargs)
        if not cuda:  # one rank alone makes a segment too
            _unlink_shm_segment(rank)
    if cuda:
        index = cuda_device_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    nonce = [uuid.uuid4().hex[:12]]
    if world_size > 1:
        torch.distributed.broadcast_object_list(nonce, src=0)
    return DistEnv(rank, local_rank, world_size, device, nonce[0])


def keep_freed_cpu_memory() -> bool:
    """Make this CPU process reuse the memory it frees instead of handing it back to the OS.

    glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
    unmaps it on free, so each training step page-faults its large tensors in again: the logits,
    DeepSpeed's flattened gradient partition and fp64 norm copies. On this project's 2-core machine
    that made a 47 MB flatten take 38 ms instead of 13 and slowed a whole small-shape step by ~10%
    (``tools/bench_train.py``). With mmap off and a 1 GiB trim threshold, freed blocks stay in
    the heap and are refilled from pages already there; a process keeps its peak resident size.
    Called by CPU training runs (``train.run.start``) and the benchmark's runs, plain PyTorch's too.
    Returns False where the C library has no ``mallopt`` (not glibc): its allocator stays as it is.
    """
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


SHM_DIR = Path("/dev/shm")
SHM_SEGMENT = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""The name DeepSpeed's CPU all-reduce gives each rank's shared-memory segment (0.19.8,
``csrc/cpu/comm/shm.cpp``: SHM_BUFFER_NAME, then uid, MASTER_ADDR, MASTER_PORT and the rank)."""


def _unlink_shm_segment(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce segment once every rank has mapped
    every other rank's.

    When all ranks are on one machine, DeepSpeed's CPU communication op (``shm_initialize``) creates
    a 66 MB shared-memory segment per rank in /dev/shm and maps every peer's, but never unlinks
    them: every CPU run left world_size x 66 MB of RAM behind, under a new name per port (here they
    filled /dev/shm until the test suite was killed for memory). After the barrier every rank has
    returned from ``shm_initialize`` with every segment mapped, so the names can go; the mappings
    stay valid, and the memory is freed when the processes exit, however they exit.
    """
    barrier()
    name = SHM_SEGMENT.format(
        uid=os.getuid(),
        addr=os.environ.get("MASTER_ADDR", ""),
        port=os.environ.get("MASTER_PORT", ""),
        rank=rank,
    )
    (SHM_DIR / name).unlink(missing_ok=True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


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
