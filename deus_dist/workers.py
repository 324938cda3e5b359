"""Where new blocks are computed: in this process, in worker processes, or on torch.distributed ranks.

New blocks are independent of each other, so they are made in parallel while one writer streams the
output in layer order. Every way yields ``(task, block, report)`` in the plan's order:

- ``InProcess`` (one worker): a thread makes the next block while the writer writes, so reading,
  arithmetic and writing overlap;
- ``ProcessPool`` (``--workers N``): N spawned processes, each with its own reader, its share of
  the threads (or its own GPU), and the prepared method; at most N blocks are in flight or waiting
  to be written, which is what bounds memory;
- ``Distributed`` (``torchrun --nproc_per_node R``): rank r makes the blocks whose position in the
  plan is r modulo R and sends them to rank 0, which writes.

A method records a block's diagnostics in ``method.reports[key]`` (``key`` = "k-(k+1)"): a worker
returns them with the block and the writer's copy of the method collects them for the manifest.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deus_dist.architectures import Architecture
from deus_dist.checkpoint import CheckpointReader
from deus_dist.checkpoint.blocks import read_block
from deus_dist.errors import UserError

Block = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Task:
    index: int
    """Output layer index of the new block."""
    layers: tuple[int, ...]
    """Base layers it is made from."""

    @property
    def key(self) -> str:
        return "-".join(map(str, self.layers))


def tasks_of(plan) -> list[Task]:
    return [Task(i, tuple(src.base)) for i, src in enumerate(plan.layers) if src.new]


def make_block(method, reader: CheckpointReader, arch: Architecture, task: Task, device):
    """One new block on the CPU, and the method's report for it (or None)."""
    sources = [read_block(reader, arch, k, device) for k in task.layers]
    block = method.new_block(sources, task.layers, arch, device)
    block = {s: t.to("cpu") for s, t in block.items()}
    return block, method.reports.pop(task.key, None)


class InProcess:
    """One worker: a thread of this process makes the next block (reading its sources, then the
    arithmetic) while the writer writes the current one and the inherited layers after it, so IO
    and compute overlap; one block is made ahead, never more."""

    def __init__(self, method, reader: CheckpointReader, arch: Architecture, tasks: list[Task], device):
        self.method, self.reader, self.arch, self.tasks, self.device = method, reader, arch, tasks, device

    def _make(self, task: Task, out: queue.Queue) -> None:
        try:
            out.put((make_block(self.method, self.reader, self.arch, task, self.device), None))
        except BaseException as e:  # noqa: BLE001 - raised again in the writer's thread
            out.put((None, e))

    def _start(self, task: Task) -> queue.Queue:
        out: queue.Queue = queue.Queue(1)
        # A daemon thread: Ctrl-C or an error in the writer need not wait for a block in progress.
        threading.Thread(target=self._make, args=(task, out), daemon=True, name="deus-fuse-block").start()
        return out

    def __iter__(self) -> Iterator[tuple[Task, Block, dict | None]]:
        ahead = self._start(self.tasks[0]) if self.tasks else None
        for n, task in enumerate(self.tasks):
            made, error = ahead.get()
            if error is not None:
                raise error
            ahead = self._start(self.tasks[n + 1]) if n + 1 < len(self.tasks) else None
            block, report = made
            yield task, block, report

    def close(self) -> None:
        pass


def _next_task(todo, parent: int):
    """The next task, or None when told to stop or when the writer died (SIGKILL, OOM killer)."""
    while True:
        try:
            return todo.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _worker(rank, parent, model_dir, option, names, arch, method, device, threads, todo, done):
    """A worker process: make blocks for the tasks it is handed until it is handed None; ``names``:
    the writer's reader's (renamed, dropped), so both read the checkpoint under the same names."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    try:
        with CheckpointReader(model_dir, option) as reader:
            if names[0] or names[1]:
                reader.adopt_names(*names)
            while (task := _next_task(todo, parent)) is not None:
                block, report = make_block(method, reader, arch, task, torch.device(device))
                done.put((task.index, block, report, None))
                del block
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the writer
        done.put((None, None, None, (rank, type(e).__name__, str(e), traceback.format_exc())))


class ProcessPool:
    """N worker processes; the writer takes their blocks in plan order."""

    def __init__(
        self,
        method,
        model_dir,
        option,
        arch,
        tasks: list[Task],
        devices: list[str],
        threads: int,
        names: tuple[dict, list] = ({}, []),
    ):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fork would copy OpenMP's threads in a broken state
        self.tasks = tasks
        self.todo, self.done = ctx.Queue(), ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    os.getpid(),
                    str(model_dir),
                    option,
                    names,
                    arch,
                    method,
                    dev,
                    threads,
                    self.todo,
                    self.done,
                ),
                daemon=True,
                name=f"deus-fuse-worker-{r}",
            )
            for r, dev in enumerate(devices)
        ]
        for p in self.procs:
            p.start()

    def _take(self):
        while True:
            try:
                index, block, report, failure = self.done.get(timeout=5.0)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"fuse worker {dead[0].name} died (exit code {dead[0].exitcode}; out of memory? "
                        "try fewer --workers)"
                    ) from None
                continue
            if failure is not None:
                rank, kind, message, trace = failure
                if kind == "UserError":
                    raise UserError(message)
                print(trace, file=sys.stderr)
                raise RuntimeError(f"fuse worker {rank} failed: {kind}: {message}")
            return index, block, report

    def __iter__(self) -> Iterator[tuple[Task, Block, dict | None]]:
        workers = len(self.procs)
        submitted = 0
        waiting: dict[int, tuple[Block, dict | None]] = {}
        for n, task in enumerate(self.tasks):
            # At most `workers` blocks in flight or waiting to be written: memory stays bounded.
            while submitted < len(self.tasks) and submitted < n + workers:
                self.todo.put(self.tasks[submitted])
                submitted += 1
            while task.index not in waiting:
                index, block, report = self._take()
                waiting[index] = (block, report)
            block, report = waiting.pop(task.index)
            # Every block has arrived once the last is handed over: the workers may end gracefully.
            self.finished = n == len(self.tasks) - 1
            yield task, block, report

    finished = False

    def close(self) -> None:
        """Stop the workers: at once when the run did not finish (an error, Ctrl-C, SIGTERM)."""
        for _ in self.procs:
            self.todo.put(None)
        for p in self.procs:
            if self.finished:
                p.join(timeout=30)
            if p.is_alive():
                p.terminate()
            p.join()


class Distributed:
    """Rank r of R makes the tasks at plan positions r, r + R, ...; rank 0 receives and writes.

    Tensors go rank -> rank 0 with point-to-point sends in the block's suffix order (their shapes
    are known on both sides); reports go as pickled objects. On NCCL the tensors travel on the GPU.
    """

    def __init__(self, method, reader, arch, tasks: list[Task], device, block_shapes: dict[str, tuple]):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.method, self.reader, self.arch, self.tasks, self.device = method, reader, arch, tasks, device
        self.shapes = block_shapes
        self.wire = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def owner(self, n: int) -> int:
        return n % self.world

    def _suffixes(self, task: Task) -> list[str]:
        """The block's tensors, in suffix order: those of its lower source layer (in a hybrid,
        layers of different types hold different tensors)."""
        return [s for s in self.shapes if self.arch.layer_name(task.layers[0], s) in self.reader.tensors]

    def _mine(self) -> list[Task]:
        return [t for n, t in enumerate(self.tasks) if self.owner(n) == self.rank]

    def serve(self) -> None:
        """On ranks > 0: make this rank's blocks and send each to rank 0."""
        for task, block, report in InProcess(self.method, self.reader, self.arch, self._mine(), self.device):
            self.dist.send_object_list([task.index, report], dst=0)
            for s in self._suffixes(task):
                self.dist.send(block[s].to(self.wire, torch.float32).contiguous(), dst=0)
            del block

    def __iter__(self) -> Iterator[tuple[Task, Block, dict | None]]:
        mine = iter(InProcess(self.method, self.reader, self.arch, self._mine(), self.device))
        for n, task in enumerate(self.tasks):
            src = self.owner(n)
            if src == 0:
                yield next(mine)
                continue
            header = [None, None]
            self.dist.recv_object_list(header, src=src)
            index, report = header
            if index != task.index:
                raise RuntimeError(f"rank {src} sent block {index}, expected {task.index}")
            block = {}
            for s in self._suffixes(task):
                buf = torch.empty(self.shapes[s], dtype=torch.float32, device=self.wire)
                self.dist.recv(buf, src=src)
                block[s] = buf.to("cpu")
            yield task, block, report

    def close(self) -> None:
        pass


def distributed_world() -> int:
    """The launcher's world size (1 when not launched by torchrun). Only the fuse tool's own entry
    point shares its blocks over it: a fuse run inside a training job (the default model) is one
    rank's work while the others wait."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class WorkerPlan:
    count: int
    """Workers making blocks at once (under torchrun: the ranks, one worker each)."""
    devices: list[str]
    """One device per worker of this process ("cpu", or "cuda:i" for worker i's GPU; under
    torchrun this rank's)."""
    threads: int
    """CPU threads per worker."""
    per_worker_bytes: int
    """Peak memory of one worker making one block (sources, new block, cost, solver), plus its
    finished block waiting for the writer."""
    available_bytes: int
    """Memory free where the blocks are made (host RAM, or the smallest visible GPU's)."""
    distributed: bool = False


def human(nbytes: float) -> str:
    """1.5 GiB, 320.0 MiB."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 / 10 else f"{nbytes / 2**20:.1f} MiB"


def available_memory(device: str) -> int:
    """Bytes free for new allocations on ``device`` (host: MemAvailable, the page cache counted)."""
    if device.startswith("cuda"):
        return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_option_problems(cfg, world: int = 1) -> list[str]:
    """--workers settings that cannot work whatever the memory (``world``: torchrun ranks sharing
    the blocks, 1 when the tool runs alone)."""
    requested = cfg.workers
    if requested is None:
        return []
    if requested < 1:
        return [f"--workers must be at least 1, got {requested}"]
    problems = []
    if world > 1 and requested != 1:
        problems.append(
            f"--workers {requested}: under torchrun each rank is one worker; set --nproc_per_node instead"
        )
    if requested > 1 and cfg.ot_cost == "activations":
        problems.append(
            "--workers: --ot_cost activations runs the base model one layer at a time in one process; "
            "use --workers 1 (or --ot_cost weights)"
        )
    return problems


def plan_workers(cfg, method, block_bytes: int, tasks: int, world: int = 1) -> WorkerPlan:
    """How many workers make the blocks, on which devices, checked against free memory. A setting
    that cannot fit is refused with the figures; the default takes what fits. The options
    themselves were checked by :func:`worker_option_problems`."""
    requested = cfg.workers
    # A worker's peak while making a block, and its finished block waiting for the writer.
    per_worker = method.working_bytes(block_bytes) + block_bytes
    cuda = cfg.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    available = available_memory("cuda" if cuda else "cpu")
    fit = max(0, int(available * 0.9) // max(per_worker, 1))
    if world > 1:
        if fit < 1:
            raise UserError(
                f"--model: making one block takes about {human(per_worker)} and only "
                f"{human(available)} is free on each rank's device"
            )
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if cuda else "cpu"
        return WorkerPlan(world, [device], torch.get_num_threads(), per_worker, available, distributed=True)
    # On CPUs the workers share the host's memory; on GPUs each has its own device.
    cap = gpus if cuda else min(cpu_cores(), fit)
    if requested is None:
        count = max(1, min(cap, tasks)) if method.parallel else 1
    else:
        count = requested
        if cuda and count > gpus:
            raise UserError(
                f"--workers {count}: only {gpus} GPU(s) visible with --device cuda (one worker per GPU)"
            )
    sharing = 1 if cuda else count  # workers whose blocks share one device's memory
    if sharing > fit:
        where = " on the smallest GPU" if cuda else ""
        advice = f"use --workers {fit}" if fit >= 1 and not cuda else "use a machine with more memory"
        raise UserError(
            f"--workers {count}: each worker needs about {human(per_worker)} to make a block and "
            f"{human(available)} is free{where}, room for {fit}; {advice}"
        )
    devices = [f"cuda:{i}" for i in range(count)] if cuda else ["cpu"] * count
    threads = 1 if cuda else max(1, cpu_cores() // count)
    return WorkerPlan(count, devices, threads, per_worker, available)


def init_distributed(device: str):
    """Join the torchrun group (gloo on CPU, NCCL on GPUs) once; the rank's device."""
    import datetime

    import torch.distributed as dist

    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60)
        )
    return dist.get_rank()


def measured_gflops(device: torch.device) -> float:
    """float32 GEMM rate of this device now (a 1024^3 product, timed after a warm-up)."""
    import time

    x = torch.randn(1024, 1024, device=device)
    x @ x
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        x @ x
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 3 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9
