"""Training checkpoints: DeepSpeed's partitioned state of the trainable parameters, plus ours.

Layout under ``RUN_DIR/checkpoints``::

    step-00000040/                    one complete checkpoint
        zero_pp_rank_R_mp_rank_00_model_states.pt        DeepSpeed's files, named by DeepSpeed
        [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt (the bf16_ prefix under bf16); frozen
                                                          weights excluded: they come from --model
        rng_rank_R.pt                 every rank's RNG state
        trainer_state.json            TrainState: step, data position, model identity, options
        universal/                    made on a resume with another world size (DeepSpeed's
                                      universal format: full fp32 masters and Adam moments)
    latest                            the newest complete tag (DeepSpeed's convention)

A checkpoint is written under a hidden ``.partial-step-N`` name, every file is flushed to disk, and
it is renamed once every rank has written its part, so a killed save never looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import random
import re
import shutil
import socket
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deus_dist.atomic import build_once, fsync_tree, replace_dir, write_text_atomic
from deus_dist.configs import global_batch
from deus_dist.errors import CheckpointError, UserError
from deus_dist.train.dist import DistEnv, barrier

STATE_NAME = "trainer_state.json"
TAG_PREFIX = "step-"
UNIVERSAL = "universal"
RANK_FILE = re.compile(r"(?:^|_)rank_(\d+)[_.]")
"""The rank in DeepSpeed's file names (``[bf16_]zero_pp_rank_R_mp_rank_00_*``) and in ours."""


@dataclass
class TrainState:
    """Everything a resume needs besides DeepSpeed's tensors; saved and loaded whole."""

    total_steps: int
    world_size: int
    model: dict
    """{"path", "identity"} of the checkpoint training started from."""
    trainable: list[str]
    options: dict
    step: int = 0
    """Optimizer steps done."""
    consumed: int = 0
    """Training blocks consumed: the data position."""
    tokens: int = 0
    global_batch: int | None = None
    """Sequences per optimizer step (micro_batch * grad_accum * world size)."""
    precision: str | None = None
    """bf16 or fp32: what DeepSpeed computed in (its file names depend on it)."""
    data: dict | None = None
    """The data cache key: what the training stream is made of (content, not paths)."""

    def saved_global_batch(self) -> int | None:
        if self.global_batch is not None:
            return self.global_batch
        try:  # checkpoints from before global_batch was recorded
            return global_batch(
                int(self.options["micro_batch"]), int(self.options["grad_accum"]), self.world_size
            )
        except (KeyError, TypeError, ValueError):
            return None


def model_identity(model_dir: Path) -> str:
    """A fingerprint of a checkpoint: its config, manifest and each shard's size and both ends.

    Two up-scalings of one base with different methods share a config but not their manifest or
    their weights, so a checkpoint trained from one is refused on the other.
    """
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    for name in ("config.json", "deus_manifest.json"):
        if (model_dir / name).is_file():
            h.update((model_dir / name).read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(f"{shard.name}:{size}".encode())
        with open(shard, "rb") as f:
            h.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            h.update(f.read(1 << 16))
    return "sha256:" + h.hexdigest()


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{TAG_PREFIX}*") if (p / STATE_NAME).is_file())


def find_checkpoint(resume: str, run_dir: Path, option: str = "--resume") -> Path | None:
    """The checkpoint ``resume`` names (the value of ``option``): None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if (path / STATE_NAME).is_file():
        return path
    found = complete_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(
        f"{option}: {resume} holds no complete checkpoint (no {STATE_NAME} in it or in a step-* folder)"
    )


def read_state(path: Path, option: str = "--resume") -> TrainState:
    try:
        return TrainState(**json.loads((path / STATE_NAME).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{option}: {path / STATE_NAME} is unreadable: {e}") from None


@dataclass(frozen=True)
class RunIdentity:
    """What a run's training stream and trainable state are made of, compared on resume."""

    model_identity: str
    model: str
    trainable: list[str]
    seq_len: int
    global_batch: int
    seed: int
    precision: str
    data: dict


def resume_conflicts(
    state: TrainState, path: Path, run: RunIdentity, batch_text: str, key_options: dict[str, str]
) -> list[str]:
    """Why ``path`` cannot continue ``run``: each problem names the option, both values and the way
    forward. The world size may differ (the checkpoint is converted); --max_steps may change."""
    fresh = "or start a new run (--resume none, or another --output_dir)"
    problems = []
    if state.model["identity"] != run.model_identity:
        problems.append(
            f"--model: {path} was trained from {state.model['path']}, not from --model {run.model} "
            f"(a different checkpoint); pass the same --model, {fresh}"
        )
    if state.trainable != run.trainable:
        problems.append(
            f"--trainable: {path} trained {len(state.trainable)} parameters, this run selects "
            f"{len(run.trainable)}; use the --trainable/--train_embeddings of the original run, {fresh}"
        )
    saved = state.options
    if saved.get("seq_len") is not None and int(saved["seq_len"]) != run.seq_len:
        problems.append(
            f"--seq_len: {path} was trained with {saved['seq_len']}, this run has {run.seq_len}; pass "
            f"--seq_len {saved['seq_len']}, {fresh}"
        )
    if state.saved_global_batch() not in (None, run.global_batch):
        problems.append(
            f"--grad_accum/--micro_batch: {path} was trained with a global batch of {state.saved_global_batch()} "
            f"sequences, this run has {batch_text}; leave --grad_accum out (it is then chosen to keep the global "
            f"batch), {fresh}"
        )
    if int(saved.get("seed", run.seed)) != run.seed:
        problems.append(
            f"--seed: {path} was trained with --seed {saved['seed']}, this run has {run.seed}; pass "
            f"--seed {saved['seed']}, {fresh}"
        )
    if state.precision is not None and state.precision != run.precision:
        problems.append(
            f"--precision: {path} was trained in {state.precision}, this run computes in "
            f"{run.precision}; pass --precision {state.precision}, {fresh}"
        )
    if state.data is not None:
        problems += _data_conflicts(state.data, run.data, path, fresh, key_options)
    return problems


def _data_conflicts(saved: dict, now: dict, path: Path, fresh: str, key_options: dict[str, str]) -> list[str]:
    """The parts of the data's cache key that changed, each named by the option it comes from
    (``key_options``; --seq_len is compared on its own, the held-out set alone may change)."""
    problems = []
    for key, option in key_options.items():
        if saved.get(key) == now.get(key) or key == "tokenizer":  # the tokenizer is part of --model
            continue
        if key == "train":
            problems.append(
                f"--data: {path} was trained on other data (its files' names, sizes or contents differ; the "
                f"same files under another path are fine); pass the data it was trained on, {fresh}"
            )
        elif key == "eval_fraction":
            problems.append(
                f"{option}: {path} held out {_held(saved)}, this run holds out {_held(now)}, which changes the "
                f"training records; use the original held-out setting, {fresh}"
            )
        else:
            problems.append(
                f"{option}: {path} was trained with {saved.get(key)!r}, this run has {now.get(key)!r}; pass "
                f"the original {option}, {fresh}"
            )
    return problems


def _held(key: dict) -> str:
    return "--eval_data" if key.get("eval") else f"--eval_fraction {key.get('eval_fraction')}"


def rank_files(path: Path) -> dict[str, dict[int, Path]]:
    """DeepSpeed's model and optimizer files in ``path`` by rank, found the way DeepSpeed's own
    tools find them (``zero_to_fp32``'s globs), whatever their precision prefix."""
    found: dict[str, dict[int, Path]] = {"model": {}, "optim": {}}
    for kind in found:
        for f in sorted(Path(path).glob(f"*_{kind}_states.pt")):
            m = RANK_FILE.search(f.name)
            if m:
                found[kind][int(m.group(1))] = f
    return found


def damaged_files(path: Path, world_size: int) -> list[str]:
    """Every rank's DeepSpeed files are present and their zip directory reads (a truncated file
    fails here, before any rank starts, instead of inside DeepSpeed on one rank)."""
    problems = []
    found = rank_files(path)
    way = "resume from an earlier checkpoint with --resume PATH, or start over with --resume none"
    # ZeRO-3 writes each rank's model states (zero_pp_rank_R_mp_rank_00_model_states.pt); ZeRO-1/2
    # replicate the model, so rank 0 writes the one mp_rank_00_model_states.pt
    replicated = (Path(path) / "mp_rank_00_model_states.pt").is_file()
    for kind in ("model", "optim"):
        for rank in range(1 if kind == "model" and replicated else world_size):
            f = found[kind].get(rank)
            if f is None:
                problems.append(
                    f"--resume: {path} has no {kind} states of rank {rank} (DeepSpeed's "
                    f"*_{kind}_states.pt files); {way}"
                )
                continue
            try:
                with zipfile.ZipFile(f):
                    pass
            except (OSError, zipfile.BadZipFile) as e:
                problems.append(f"--resume: {f} is missing or corrupt ({type(e).__name__}); {way}")
    return problems


def universal_checkpoint(path: Path, log=print) -> Path:
    """``path`` in DeepSpeed's universal format (``path/universal``), converted once with
    DeepSpeed's own converter (``ds_to_universal``): every trainable parameter's full fp32 master
    and Adam moments, which any world size can load. Frozen weights are not in it: they come from
    --model as always."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    def convert(tmp: Path) -> None:
        log(f"converting {path} to DeepSpeed's universal format (once) for a new world size")
        args = argparse.Namespace(
            input_folder=str(path),
            output_folder=str(tmp),
            num_extract_workers=1,  # no worker pool: this runs inside a rank with live process groups
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # ZeRO-1/2 checkpoints of a plain (not Megatron) model carry no universal_checkpoint_info;
            # the converter's own switch adds its version record (ZeRO-3 does not read it)
            inject_missing_state=True,
        )
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
        (tmp.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer to tmp

    return build_once(Path(path) / UNIVERSAL, convert)


def _own_file(rank: int):
    def select(path: Path) -> bool:
        m = RANK_FILE.search(path.name)
        return m is not None and int(m.group(1)) == rank

    return select


def save(engine, env: DistEnv, state: TrainState, root: Path, keep: int) -> Path:
    """Collective: every rank writes its partition and flushes it to disk; rank 0 finalizes by
    rename once all have."""
    tag = tag_for(state.step)
    partial = f".partial-{tag}"
    if env.is_main:
        shutil.rmtree(root / partial, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=partial, exclude_frozen_parameters=True, save_latest=False)
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    torch.save(rng, root / partial / f"rng_rank_{env.rank}.pt")
    fsync_tree(root / partial, _own_file(env.rank))  # this rank's files are on disk before the rename
    barrier()
    final = root / tag
    if env.is_main:
        (root / partial / STATE_NAME).write_text(json.dumps(asdict(state), indent=1) + "\n")
        fsync_tree(root / partial, lambda f: f.name == STATE_NAME)
        replace_dir(root / partial, final)  # a step saved again: the old copy survives a failed rename
        write_text_atomic(root / "latest", tag)
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _unshare_step_counts(zero_optimizer) -> None:
    """Give every optimizer sub-group its own Adam step counter after a universal load.

    DeepSpeed 0.19.8's ZeRO-3 universal loader (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``
    in ``deepspeed/runtime/zero/stage3.py``) stores one ``step`` tensor object in the state of every
    sub-group; torch's fused and foreach AdamW increment step tensors in place, so the shared one
    advances once per sub-group per step and the bias correction runs ahead from the first step
    after the resume (measured: losses drift from an uninterrupted run's at 1e-4 within 3 steps).
    """
    for state in zero_optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


FORMAT_FAILURES = (
    "PytorchStreamReader",  # torch.load of a truncated or overwritten zip
    "invalid load key",
    "Error(s) in loading state_dict",
    "size mismatch",
)
"""What torch and DeepSpeed say, in a RuntimeError, about a file that is not the checkpoint it
should be; any other RuntimeError (out of memory, a collective that failed) is not the file's."""


def is_format_failure(e: BaseException) -> bool:
    """Whether ``e``, raised while loading a checkpoint, says its files are damaged or inconsistent."""
    if isinstance(e, (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError)):
        return True
    return (
        isinstance(e, RuntimeError)
        and not isinstance(e, torch.OutOfMemoryError)
        and any(s in str(e) for s in FORMAT_FAILURES)
    )


def load(engine, env: DistEnv, path: Path, universal: bool = False) -> TrainState:
    """Collective: restore DeepSpeed's state, this rank's RNG, and the TrainState.

    ``universal``: load ``path/universal`` (made by ``universal_checkpoint``; the engine was built
    with ``"checkpoint": {"load_universal": true}``) into this world size's partitions. Ranks
    without an RNG file of their own (a larger world) keep their seeded state.
    """
    try:
        loaded, _ = engine.load_checkpoint(
            str(path) if universal else str(path.parent),
            tag=UNIVERSAL if universal else path.name,
            load_module_strict=False,  # frozen weights are not in the checkpoint: they came from --model
            load_lr_scheduler_states=False,  # the schedule is a function of the step
        )
        rng_file = path / f"rng_rank_{env.rank}.pt"
        rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    except (FileNotFoundError, PermissionError) as e:
        raise CheckpointError(f"--resume: cannot read {e.filename} ({e.strerror})") from None
    except Exception as e:
        if not is_format_failure(e):  # out of memory, a peer gone: not the checkpoint's fault
            e.add_note(f"while rank {env.rank} ({socket.gethostname()}) loaded the checkpoint {path}")
            raise
        raise CheckpointError(
            f"--resume: {path} is corrupt or incomplete ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "resume from an earlier checkpoint with --resume PATH, or start over with --resume none"
        ) from None
    if loaded is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load {path}")
    if universal:
        _unshare_step_counts(engine.optimizer)
    if rng is not None:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return read_state(path)
