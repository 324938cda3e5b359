"""Files the package ships as data, found wherever it is installed (editable or not).

``ds_configs/`` (the DeepSpeed JSON configs), ``studies/`` (the study files) and ``slurm/`` (the
batch scripts) live inside the package; the repository's top-level ``ds_configs/``, ``studies/``
and ``launchers/slurm/`` are links to them, so the documented paths and the installed package read
the same files.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
DS_CONFIGS = ROOT / "ds_configs"
STUDIES = ROOT / "studies"
SLURM = ROOT / "slurm"
DEFAULT_STUDY = STUDIES / "default.yaml"


def default_ds_config(cuda: bool) -> Path:
    """The shipped ZeRO-3 config: zero3.json with a GPU, zero3_cpu.json on CPUs."""
    return DS_CONFIGS / ("zero3.json" if cuda else "zero3_cpu.json")


def slurm_script(name: str) -> Path:
    return SLURM / name
