"""Training checkpoints: DeepSpeed's partitioned state of the trainable parameters, plus ours.

Layout under ``RUN_DIR/checkpoints``::

    step-00000040/                    one complete checkpoint
        zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt   (DeepSpeed; frozen weights excluded:
                                                             they come from the base checkpoint)
        rng_rank_R.pt                 every rank's RNG state
        trainer_state.json            TrainState: step, data position, model identity, options
    latest                            the newest complete tag (DeepSpeed's convention)

A checkpoint is written under a hidden ``.partial-step-N`` name and renamed once every rank has
written its part, so a killed save never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deus_dist.errors import CheckpointError, UserError
from deus_dist.train.dist import DistEnv, barrier

STATE_NAME = "trainer_state.json"
TAG_PREFIX = "step-"


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
    """The checkpoint ``--resume`` names: None for a fresh start."""
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
        f"--resume: {resume} holds no complete checkpoint (no {STATE_NAME} in it or in a step-* folder)"
    )


def read_state(path: Path, option: str = "--resume") -> TrainState:
    try:
        return TrainState(**json.loads((path / STATE_NAME).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{option}: {path / STATE_NAME} is unreadable: {e}") from None


def check_resume(
    state: TrainState, path: Path, *, identity: str, model: str, world_size: int, trainable: list[str]
) -> None:
    """Refuse a checkpoint that cannot continue this run, saying how to go on."""
    problems = []
    if state.model["identity"] != identity:
        problems.append(
            f"--resume: {path} was trained from {state.model['path']}, not from --model {model} "
            "(a different checkpoint); pass the same --model, or --resume none for a new run"
        )
    if state.world_size != world_size:
        problems.append(
            f"--resume: {path} was written by {state.world_size} ranks but this run has {world_size}; "
            f"restart on {state.world_size} ranks (--num_gpus/--nnodes), or convert it into a plain HF "
            f"checkpoint with `python tools/export_hf.py {path} OUT` and start a new run with --model OUT"
        )
    if state.trainable != trainable:
        problems.append(
            f"--trainable: {path} trained {len(state.trainable)} parameters, this run selects "
            f"{len(trainable)}; use the --trainable/--train_embeddings of the original run"
        )
    if not problems:
        problems += _damaged_files(path, state.world_size)
    if problems:
        raise UserError(problems)


def _damaged_files(path: Path, world_size: int) -> list[str]:
    """Every rank's DeepSpeed files are present and their zip directory reads (a truncated file
    fails here, before any rank starts, instead of inside DeepSpeed on one rank)."""
    problems = []
    for rank in range(world_size):
        for kind in ("model", "optim"):
            f = path / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
            try:
                with zipfile.ZipFile(f):
                    pass
            except (OSError, zipfile.BadZipFile) as e:
                problems.append(
                    f"--resume: {f} is missing or corrupt ({type(e).__name__}); resume from an earlier "
                    "checkpoint with --resume PATH, or start over with --resume none"
                )
    return problems


def save(engine, env: DistEnv, state: TrainState, root: Path, keep: int) -> Path:
    """Collective: every rank writes its partition; rank 0 finalizes by rename."""
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
    barrier()
    final = root / tag
    if env.is_main:
        (root / partial / STATE_NAME).write_text(json.dumps(asdict(state), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        (root / partial).rename(final)
        (root / "latest").write_text(tag)
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(engine, env: DistEnv, path: Path) -> TrainState:
    """Collective: restore DeepSpeed's state, this rank's RNG, and the TrainState."""
    try:
        loaded, _ = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=False,  # frozen weights are not in the checkpoint: they came from --model
            load_lr_scheduler_states=False,  # the schedule is a function of the step
        )
        rng_file = path / f"rng_rank_{env.rank}.pt"
        rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError, OSError) as e:
        raise CheckpointError(
            f"--resume: {path} is corrupt or incomplete ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "resume from an earlier checkpoint with --resume PATH, or start over with --resume none"
        ) from None
    if loaded is None:
        raise CheckpointError(f"--resume: DeepSpeed could not load {path}")
    if rng is not None:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return read_state(path)
