"""Export a training checkpoint as a plain HF checkpoint (sharded safetensors, config, tokenizer).

Trained tensors come from DeepSpeed's fp32 master partitions, gathered and cast to the input
checkpoint's dtype; every other tensor is copied byte for byte from the input checkpoint, so
frozen weights are bit-identical whatever precision training used. The manifest is extended with
the training run (``training``, a list: a model trained twice keeps both entries).
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

from deus_dist.atomic import atomic_output_dir
from deus_dist.checkpoint import (
    CheckpointReader,
    ShardedWriter,
    TensorSpec,
    copy_aux_files,
)
from deus_dist.checkpoint.layout import read_as_loaded, to_disk_layout
from deus_dist.checkpoint.manifest import MANIFEST_NAME
from deus_dist.checkpoint.writer import parse_size
from deus_dist.errors import CheckpointError, Problems, UserError
from deus_dist.hf_logging import quiet_transformers
from deus_dist.outputs import Input, output_problems
from deus_dist.train.checkpointing import find_checkpoint, model_identity, read_state


def trained_tensors(checkpoint: Path) -> dict:
    """fp32 values of the trained parameters in a checkpoint (gathered from every rank's file)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # it prints per file and shows progress bars
    with (
        quiet_transformers(True),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        try:
            return get_fp32_state_dict_from_zero_checkpoint(
                str(checkpoint.parent), tag=checkpoint.name, exclude_frozen_parameters=True
            )
        except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
            raise CheckpointError(
                f"CHECKPOINT_DIR: {checkpoint} is incomplete or corrupt ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    force: bool = False,
    shard_size: str = "5GB",
    extra_files: dict[str, str] | None = None,
    log=print,
) -> Path:
    """Write ``out`` from a training checkpoint and the checkpoint it started from; ``extra_files``
    (name -> text) are written beside the weights (sft: the chat template trained with)."""
    problems = Problems()
    found = problems.attempt(lambda: find_checkpoint(str(checkpoint), Path(checkpoint), "CHECKPOINT_DIR"))
    state = problems.attempt(lambda: read_state(found, "CHECKPOINT_DIR")) if found else None
    base_dir = Path(base) if base else Path(state.model["path"]) if state else None
    inputs = [Input("CHECKPOINT_DIR", checkpoint), Input("--base" if base else "its base model", base_dir)]
    if found is not None and found.parent.name == "checkpoints":  # RUN/checkpoints/step-N
        inputs.append(Input("the run directory of CHECKPOINT_DIR", found.parent.parent, holds_outputs=True))
    problems.items += output_problems(out, "OUT_DIR", "dir", inputs)
    problems.raise_if_any()
    if not (base_dir / "config.json").is_file():
        raise UserError(
            f"--base: {base_dir} (the checkpoint training started from) is not there; pass --base DIR"
        )
    if model_identity(base_dir) != state.model["identity"]:
        raise UserError(f"--base: {base_dir} is not the checkpoint {found} was trained from")
    max_shard = parse_size(shard_size, "--shard_size")
    # DeepSpeed's checkpoint holds the model's parameters (stacked experts, say); the base and the
    # export hold the on-disk tensors
    trained = to_disk_layout(base_dir, trained_tensors(found))
    with CheckpointReader(base_dir, option="--base") as reader:
        read_as_loaded(reader)  # the names training used (the trained tensors carry them)
        tied = reader.config.get("tie_word_embeddings", False)
        extra = sorted(n for n in trained if n not in reader.tensors and not (tied and n == "lm_head.weight"))
        if extra:
            raise CheckpointError(f"CHECKPOINT_DIR: {found} holds tensors the base lacks: {extra[:3]}")
        specs = [TensorSpec(n, tuple(i.shape), i.dtype) for n, i in reader.tensors.items()]
        log(
            f"exporting {found} (step {state.step}): {len(trained)} trained tensors, the rest from {base_dir}"
        )
        with atomic_output_dir(Path(out), force, option="OUT_DIR") as tmp:
            writer = ShardedWriter(tmp, specs, max_shard)
            try:
                for spec in specs:
                    if spec.name in trained:
                        writer.write(spec.name, trained[spec.name].to(spec.dtype))
                    else:
                        writer.write(spec.name, reader.read(spec.name))
                writer.finish()
            finally:
                writer.close()
            shutil.copy2(base_dir / "config.json", tmp / "config.json")
            copy_aux_files(base_dir, tmp)
            run = {k: v for k, v in asdict(state).items() if k not in ("trainable",)}
            run["checkpoint"] = str(found.resolve())
            run["trainable_parameters"] = len(state.trainable)
            if (base_dir / MANIFEST_NAME).is_file():
                manifest = json.loads((base_dir / MANIFEST_NAME).read_text())
                manifest["training"] = list(manifest.get("training", [])) + [run]
                (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
            (tmp / "training_run.json").write_text(json.dumps(run, indent=2) + "\n")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
    log(f"exported {out}")
    return Path(out)
