"""``deus_manifest.json``: what an up-scaling did, written beside the weights.

Fields: ``method``, ``params`` (the resolved plan and method settings), ``num_layers_before``,
``num_layers_after``, ``new_layers`` (output indices of this up-scaling's new blocks), ``layers``
(for each output index, its source), ``base_model``, ``base_config_hash``, ``tool_version``,
``created``, ``history`` (manifests of earlier up-scalings of the input, oldest first) and
optional ``diagnostics``. The launchers read ``new_layers``; nothing infers it from names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from deus_dist import __version__
from deus_dist.errors import CheckpointError
from deus_dist.plan import LayerPlan

MANIFEST_NAME = "deus_manifest.json"


def read_manifest(model_dir: Path, option: str = "--model") -> dict | None:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{option}: cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or "new_layers" not in manifest:
        raise CheckpointError(f"{option}: {path} is not a deus-dist manifest (no new_layers)")
    return manifest


def build_manifest(
    *,
    method: str,
    params: dict,
    plan: LayerPlan,
    base_model: str,
    base_config_hash: str,
    previous: dict | None,
    diagnostics: dict | None = None,
) -> dict:
    history = []
    if previous is not None:
        history = list(previous.get("history", [])) + [{k: v for k, v in previous.items() if k != "history"}]
    manifest = {
        "method": method,
        "params": params,
        "num_layers_before": plan.num_layers_before,
        "num_layers_after": plan.num_layers_after,
        "new_layers": plan.new_layers,
        "layers": [{"index": i, "source": s.to_json()} for i, s in enumerate(plan.layers)],
        "base_model": base_model,
        "base_config_hash": base_config_hash,
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "history": history,
    }
    if diagnostics:
        manifest["diagnostics"] = diagnostics
    return manifest


def write_manifest(out_dir: Path, manifest: dict) -> None:
    (Path(out_dir) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
