"""Turning a ``--model`` value into a local checkpoint directory, and what a tool needs of one (a
tokenizer, a context long enough), each missing piece one error naming the option."""

from __future__ import annotations

import re
from pathlib import Path

from deus_dist.errors import UserError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def is_hub_name(value: str) -> bool:
    """``org/name`` that is not a local path: resolve_model_path fetches it from the hub."""
    return not Path(value).expanduser().exists() and bool(_HUB_NAME.match(value))


def resolve_model_path(value: str, option: str = "--model") -> Path:
    """A local directory as is; ``org/name`` that is not a local path is fetched from the HF hub
    (for users on clusters; honours ``HF_HUB_OFFLINE`` and the local hub cache)."""
    if not is_hub_name(value):
        return Path(value).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(value, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean "not available"
        raise UserError(
            f"{option}: {value} is neither a local directory nor a model the hub returned "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def checkpoint_dir(value: str, option: str = "--model") -> Path:
    """An HF checkpoint directory for an option that reads one: a hub name fetched, or a local path
    that must hold config.json (defaults are resolved above this layer: embedded.model_or_default)."""
    path = resolve_model_path(value, option)
    if not (path / "config.json").is_file():
        raise UserError(f"{option}: {path} is not an HF checkpoint directory (no config.json)")
    return path


def load_tokenizer(model_dir: Path, option: str = "--model"):
    """The checkpoint's tokenizer; a UserError naming ``option`` when it has none that loads (a
    checkpoint saved without its tokenizer files)."""
    from transformers import AutoTokenizer

    from deus_dist.hf_logging import quiet_transformers

    try:
        with quiet_transformers(True):
            return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(
            f"{option}: {model_dir} has no usable tokenizer ({str(e).strip().splitlines()[0]}); copy the "
            "tokenizer files of the model it was made from into it"
        ) from None


def model_context(model_dir: Path) -> int | None:
    """``max_position_embeddings`` of the checkpoint's config.json, None when it has none."""
    import json

    try:
        context = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None  # the checkpoint's own checks report an unreadable config
    return context if isinstance(context, int) else None


def context_problems(model_dir: Path, seq_len: int) -> list[str]:
    """``--seq_len`` longer than the context in the checkpoint's config.json."""
    context = model_context(model_dir)
    if context is not None and seq_len > context:
        return [f"--seq_len {seq_len} exceeds the model's context of {context} tokens"]
    return []
