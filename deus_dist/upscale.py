"""Up-scaling: plan -> read -> method -> write -> verify -> rename.

Memory stays at one tensor for inherited layers and two source blocks plus the new one for new
layers: tensors are read one at a time through the shard index and streamed into size-capped
shards whose layout is fixed before any weight is computed.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deus_dist import verify
from deus_dist.architectures import Architecture, architecture_for
from deus_dist.atomic import atomic_output_dir
from deus_dist.checkpoint import (
    CheckpointReader,
    ShardedWriter,
    TensorSpec,
    copy_aux_files,
)
from deus_dist.checkpoint.hf_config import (
    config_hash,
    layer_types_of,
    resolved_per_layer_lists,
    rewrite_config,
)
from deus_dist.checkpoint.hub import resolve_model_path
from deus_dist.checkpoint.layout import read_as_loaded
from deus_dist.checkpoint.manifest import build_manifest, read_manifest, write_manifest
from deus_dist.checkpoint.writer import parse_size
from deus_dist.configs import FuseConfig
from deus_dist.errors import CheckpointError, Problems, UserError
from deus_dist.methods import Method, get_method, unused_options
from deus_dist.outputs import Input, output_problems
from deus_dist.plan import LayerPlan
from deus_dist.workers import (
    Distributed,
    InProcess,
    ProcessPool,
    Task,
    WorkerPlan,
    human,
    init_distributed,
    measured_gflops,
    plan_workers,
    tasks_of,
    worker_option_problems,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DISK_MARGIN = 64 * 2**20


@dataclass
class Job:
    """Everything validated and resolved, ready to run."""

    cfg: FuseConfig
    model_dir: Path
    reader: CheckpointReader
    arch: Architecture
    method: Method
    plan: LayerPlan
    out: Path
    out_dtype: torch.dtype | None
    max_shard_bytes: int
    device: torch.device
    block_suffixes: list[str]
    global_names: list[str]
    layer_suffixes: list[list[str]]
    """Each base layer's tensors (layers of different types hold different ones in a hybrid)."""
    tasks: list[Task]
    """The new blocks to make, in output order."""
    workers: WorkerPlan


def _check_layers(
    reader: CheckpointReader, arch: Architecture, num_layers: int, layer_types: list | None = None
) -> tuple[list[str], list[str], list[list[str]]]:
    """Block suffixes (in description order, over every layer type), global tensor names, and
    each base layer's suffixes; errors for anything odd. ``layer_types``: each layer's type, for
    families whose layers of different types hold different tensors."""
    per_layer: dict[int, set[str]] = {}
    global_names = []
    for name in reader.tensors:
        split = arch.split_name(name)
        if split is None:
            global_names.append(name)
            continue
        i, suffix = split
        if suffix not in arch.block:
            raise CheckpointError(
                f"--model: tensor {name} is not part of the {arch.family} block description; "
                "is config.json's architecture right?"
            )
        if i >= num_layers:
            raise CheckpointError(f"--model: tensor {name} is beyond num_hidden_layers={num_layers}")
        per_layer.setdefault(i, set()).add(suffix)
    types = layer_types or [None] * num_layers
    first_of_type: dict = {}
    for i, t in enumerate(types):
        first_of_type.setdefault(t, i)
    layer_suffixes = []
    for i in range(num_layers):
        allowed = arch.suffixes_of_type(types[i])
        present = per_layer.get(first_of_type[types[i]], set())
        required = {s for s in allowed if not arch.block[s].optional}
        have = per_layer.get(i, set())
        lacking = sorted((required | present) - have)
        if lacking:
            raise CheckpointError(f"--model: layer {i} lacks {lacking[:3]} (checkpoint incomplete?)")
        foreign = sorted(have - set(allowed))
        if foreign:
            raise CheckpointError(
                f"--model: layer {i} is a {types[i]} layer (config {arch.layer_type_list}) but holds {foreign[:3]}"
            )
        layer_suffixes.append([s for s in arch.block if s in have])
    everywhere = set().union(*map(set, layer_suffixes)) if layer_suffixes else set()
    return [s for s in arch.block if s in everywhere], sorted(global_names), layer_suffixes


def _mixed_type_problems(plan: LayerPlan, layer_types: list | None, arch: Architecture) -> list[str]:
    """A new block fuses two neighbours only if they are layers of one type."""
    if not layer_types:
        return []
    bad = [src.base for src in plan.layers if src.new and len({layer_types[k] for k in src.base}) > 1]
    if not bad:
        return []
    shown = ", ".join(f"gap {a} (layer {a} {layer_types[a]}, layer {b} {layer_types[b]})" for a, b in bad)
    same = [k for k in range(len(layer_types) - 1) if layer_types[k] == layer_types[k + 1]]
    return [
        f"--positions/--placement: a new block is made only from two layers of one type "
        f"({arch.layer_type_list}); {shown} would fuse two types. Gaps joining layers of one type: {same}"
    ]


def _default_out(model_dir: Path, method: str, layers: int) -> Path:
    return Path("upscaled") / f"{model_dir.name}-{method}-{layers}L"


def default_output(cfg: FuseConfig) -> Path:
    """Where ``run(cfg)`` writes: ``--out``, or ./upscaled/<model>-<method>-<layers>L."""
    if cfg.out:
        return Path(cfg.out)
    method = get_method(cfg.method)
    if cfg.model is None:
        from deus_dist.embedded import embedded_model_dir

        model_dir = embedded_model_dir(progress=not cfg.quiet)
    else:
        model_dir = resolve_model_path(cfg.model)
    with CheckpointReader(model_dir) as reader:
        num_layers = architecture_for(reader.config).config_value(reader.config, "num_hidden_layers")
    return _default_out(model_dir, method.name, method.plan(num_layers, cfg).num_layers_after)


def validate(cfg: FuseConfig, world: int = 1) -> Job:
    """Validate every option against the input and resolve the plan; one UserError lists all
    problems. ``world`` > 1: this is one of that many torchrun ranks sharing the new blocks."""
    problems = Problems()
    attempt = problems.attempt
    method = attempt(lambda: get_method(cfg.method))
    if method is not None:
        problems.items += unused_options(method, cfg)
    max_shard = attempt(lambda: parse_size(cfg.out_shard_size))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is visible; use --device cpu")
    if cfg.model is None:
        from deus_dist.embedded import embedded_model_dir

        model_dir = attempt(lambda: embedded_model_dir(progress=not cfg.quiet))
    else:
        model_dir = attempt(lambda: resolve_model_path(cfg.model))
    reader = attempt(lambda: CheckpointReader(model_dir)) if model_dir is not None else None
    if reader is None or method is None:
        raise UserError(problems.items)
    arch = attempt(lambda: architecture_for(reader.config))
    if arch is not None:  # a base-model checkpoint's names, mask buffers: as transformers loads them
        attempt(lambda: read_as_loaded(reader))
    layers_key = arch.config_key("num_hidden_layers") if arch else "num_hidden_layers"
    num_layers = reader.config.get(layers_key)
    if not isinstance(num_layers, int) or num_layers < 1:
        problems.append(f"--model: config.json has no valid {layers_key} ({num_layers!r})")
        arch = None
    layer_types = layer_types_of(model_dir, reader.config, arch, num_layers) if arch else None
    layers = attempt(lambda: _check_layers(reader, arch, num_layers, layer_types)) if arch else None
    plan = attempt(lambda: method.plan(num_layers, cfg)) if arch else None
    if plan is not None and method.pair:
        problems.items += _mixed_type_problems(plan, layer_types, arch)
    out = None
    if plan is not None:
        out = Path(cfg.out) if cfg.out else _default_out(model_dir, method.name, plan.num_layers_after)
        clashes = output_problems(out, "--out", "dir", [Input("--model", model_dir)])
        problems.items += clashes
        if not clashes and out.exists() and not cfg.force:
            problems.append(f"--out: {out} already exists; pass --force to replace it")
    problems.items += worker_option_problems(cfg, world)
    problems.raise_if_any()
    # Last: a method's own checks and whole-model preparation (calibration) cost the most.
    method.prepare(reader, arch, plan, cfg, layers[0])
    tasks = tasks_of(plan)
    block_bytes = max(
        4 * sum(math.prod(reader.tensors[arch.layer_name(i, s)].shape) for s in suffixes)
        for i, suffixes in enumerate(layers[2])
    )
    workers = plan_workers(cfg, method, block_bytes, len(tasks), world)
    return Job(
        cfg=cfg,
        model_dir=model_dir,
        reader=reader,
        arch=arch,
        method=method,
        plan=plan,
        out=out,
        out_dtype=DTYPES.get(cfg.dtype),
        max_shard_bytes=max_shard,
        device=torch.device(cfg.device),
        block_suffixes=layers[0],
        global_names=layers[1],
        layer_suffixes=layers[2],
        tasks=tasks,
        workers=workers,
    )


def _specs(job: Job) -> list[TensorSpec]:
    def dtype_of(info):
        return job.out_dtype if job.out_dtype is not None and info.dtype.is_floating_point else info.dtype

    specs = [
        TensorSpec(n, job.reader.tensors[n].shape, dtype_of(job.reader.tensors[n])) for n in job.global_names
    ]
    for i, src in enumerate(job.plan.layers):
        for suffix in job.layer_suffixes[src.base[0]]:
            info = job.reader.tensors[job.arch.layer_name(src.base[0], suffix)]
            specs.append(TensorSpec(job.arch.layer_name(i, suffix), info.shape, dtype_of(info)))
    return specs


def _check_disk(out: Path, nbytes: int) -> None:
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < nbytes + DISK_MARGIN:
        raise UserError(
            f"--out: {parent} has {free / 1e9:.2f} GB free, the output needs {nbytes / 1e9:.2f} GB; "
            "free space or choose another --out (nothing was written)"
        )


def _progress(total: int, quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=quiet, file=sys.stderr, dynamic_ncols=True)


def block_shapes(job: Job) -> dict[str, tuple[int, ...]]:
    """Shape of each tensor of a block, by suffix (every layer holding it has the same)."""
    first = {s: next(i for i, have in enumerate(job.layer_suffixes) if s in have) for s in job.block_suffixes}
    return {s: job.reader.tensors[job.arch.layer_name(first[s], s)].shape for s in job.block_suffixes}


def block_maker(job: Job):
    """What makes the new blocks: this process, a pool of worker processes, or the torchrun ranks."""
    w = job.workers
    if w.distributed:
        return Distributed(job.method, job.reader, job.arch, job.tasks, job.device, block_shapes(job))
    if w.count == 1:
        return InProcess(job.method, job.reader, job.arch, job.tasks, torch.device(w.devices[0]))
    return ProcessPool(
        job.method,
        job.model_dir,
        job.reader.option,
        job.arch,
        job.tasks,
        w.devices,
        w.threads,
        names=(job.reader.renamed, job.reader.dropped),
    )


def write_checkpoint(job: Job, tmp: Path, specs: list[TensorSpec]) -> dict:
    """Stream the up-scaled weights (laid out as ``specs``), config, tokenizer files and manifest
    into ``tmp``. Inherited layers are copied tensor by tensor while the workers make new blocks."""
    dtype = {s.name: s.dtype for s in specs}
    writer = ShardedWriter(tmp, specs, job.max_shard_bytes)
    maker = block_maker(job)
    try:
        for name in job.global_names:
            writer.write(name, job.reader.read(name).to(dtype[name]))
        made = iter(maker)
        with _progress(job.plan.num_layers_after, job.cfg.quiet, "up-scaling") as bar:
            for i, src in enumerate(job.plan.layers):
                block = None  # inherited: streamed tensor by tensor
                if src.new:
                    task, block, report = next(made)
                    assert task.index == i, f"block {task.index} arrived for layer {i}"
                    if report is not None:
                        job.method.reports[task.key] = report
                for s in job.layer_suffixes[src.base[0]]:
                    name = job.arch.layer_name(i, s)
                    if block is not None:
                        tensor = block[s]
                    else:
                        tensor = job.reader.read(job.arch.layer_name(src.base[0], s))
                    writer.write(name, tensor.to(dtype[name]))
                del block
                bar.update(1)
        writer.finish()
    finally:
        maker.close()
        writer.close()

    config = job.reader.config
    per_layer = resolved_per_layer_lists(job.model_dir, config, job.arch)
    new_config = rewrite_config(config, per_layer, job.arch, job.plan, job.out_dtype)
    (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    copy_aux_files(job.model_dir, tmp)
    manifest = build_manifest(
        method=job.method.name,
        params={**job.plan.params, **job.method.describe(), "dtype": job.cfg.dtype},
        plan=job.plan,
        base_model=str(job.cfg.model or job.model_dir),
        base_config_hash=config_hash(config),
        previous=read_manifest(job.model_dir),
        diagnostics=job.method.diagnostics(),
    )
    write_manifest(tmp, manifest)
    return {"shards": len(writer.shards), "bytes": writer.total_bytes}


def verify_checkpoint(job: Job, tmp: Path) -> list[str]:
    """Checks on the written files before they get their final name; returns what was checked."""
    if job.cfg.verify is False:
        return ["skipped (--no_verify)"]
    done = []
    verify.check_keys_and_shapes(tmp)
    done.append("keys and shapes match transformers' model")
    if job.method.function_preserving:
        size = 2 * verify.model_bytes_fp32(job.reader)
        if job.cfg.verify or verify.fits_in_memory(size):
            diff = verify.check_logits_equal(
                job.model_dir, tmp, job.reader.config["vocab_size"], out_dtype=job.out_dtype
            )
            done.append(f"logits equal the base's (max |diff| {diff:.2g})")
        else:
            done.append(
                "logits check skipped: the models do not fit comfortably in memory (--verify forces it)"
            )
    return done


def _announce(job: Job, say) -> None:
    """What is about to happen, with the memory and (for methods bound by arithmetic) the time it
    should take, before any work starts."""
    plan, w = job.plan, job.workers
    say(
        f"{job.method.name}: {job.model_dir} ({job.arch.family}, {plan.num_layers_before} layers) -> "
        f"{job.out} ({plan.num_layers_after} layers, new at {plan.new_layers})"
    )
    reader = job.reader
    if reader.renamed:
        prefix = next(iter(reader.renamed.values())).removesuffix(next(iter(reader.renamed)))
        say(
            f"  {len(reader.renamed)} tensors are stored without the model's {prefix!r} prefix (a base-model "
            "checkpoint): read, and written, under the names transformers loads them as"
        )
    if reader.dropped:
        say(
            f"  left out {len(reader.dropped)} tensors transformers ignores on load (e.g. {reader.dropped[0]}: "
            "causal-mask and rotary buffers the model rebuilds)"
        )
    if not job.tasks:
        return
    where = (
        "torchrun ranks" if w.distributed else ("GPUs" if w.devices[0].startswith("cuda") else "processes")
    )
    line = (
        f"{len(job.tasks)} new block(s), {w.count} worker(s) ({where}, {w.threads} thread(s) each): about "
        f"{human(w.per_worker_bytes)} per worker, {human(w.available_bytes)} free"
    )
    flops = job.method.block_flops()
    if flops:
        rate = measured_gflops(job.device) * 1e9
        if job.device.type == "cpu" and not w.distributed:
            rate *= w.threads / max(1, torch.get_num_threads())
        # Measured: the assignment takes at most as long as the cost product it solves.
        seconds = math.ceil(len(job.tasks) / w.count) * 2 * flops / rate
        line += f"; estimated {seconds / 60:.1f} min of arithmetic"
    say(line)


def run(cfg: FuseConfig, log=print, world: int = 1) -> Path:
    """Validate, write into a temporary directory, verify, rename. Returns the output path.

    ``world`` > 1 (the fuse tool under torchrun): every rank validates the same inputs and makes
    its share of the new blocks; rank 0 writes, verifies and renames."""
    rank = init_distributed(cfg.device) if world > 1 else 0
    try:
        job = validate(cfg, world)
        if rank > 0:
            try:
                block_maker(job).serve()
            finally:
                job.reader.close()
            return job.out
        specs = _specs(job)
        _check_disk(job.out, sum(s.nbytes for s in specs))
        say = (lambda *a: None) if cfg.quiet else log
        _announce(job, say)
        start = time.perf_counter()
        try:
            with atomic_output_dir(job.out, cfg.force) as tmp:
                stats = write_checkpoint(job, tmp, specs)
                checks = verify_checkpoint(job, tmp)
        finally:
            job.reader.close()
        say(
            f"wrote {job.out}: {stats['shards']} shard(s), {stats['bytes'] / 1e9:.3f} GB, "
            f"{time.perf_counter() - start:.1f} s"
        )
        for line in job.method.summary():
            say(line)
        for check in checks:
            say(f"  verified: {check}")
        return job.out
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
