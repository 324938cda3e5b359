"""A study file: which ways of growing a model to compare, on what data, at which equal budget.

```yaml
base: null                      # the embedded SmolLM2, or an HF directory
train: {data: null, seq_len: 256, micro_batch: 1, max_steps: 60, lr: 3.0e-4}   # cpt.py options
budget: flops                   # tokens | flops | seconds: what every arm spends alike
seeds: [0, 1]
eval: {ppl: [embedded, chat, other.txt], tasks: [piqa, my_task], include_path: my_tasks/, task_limit: 200}
baseline: llama-pro
arms:
  - {name: opt-deus}                                          # fuse_layers.py options
  - {name: llama-pro, method: llama-pro, train: {lr: 1.0e-4}}  # train: this arm's own options
  - name: opt-deus-2stage                                     # progressive growth
    stages:
      - {method: opt-deus, num_new: 8, train: {max_steps: 30}}
      - {method: opt-deus, num_new: 7, train: {max_steps: 30}}
```

The same conventions as the other configs: keys are the tools' option names, unknown keys are
errors, and every problem is found at once, before any cell starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from deus_dist.config_values import convert_value, load_yaml
from deus_dist.configs import FuseConfig, SftConfig, TrainConfig
from deus_dist.errors import Problems, UserError

STUDY_KEYS = ("base", "train", "sft", "budget", "seeds", "eval", "baseline", "arms")
EVAL_KEYS = ("ppl", "tasks", "include_path", "task_limit", "ppl_tokens", "ppl_seq_len")
BUDGETS = ("tokens", "flops", "seconds")
LAUNCHERS = ("local", "slurm")
TRAIN_OWNED = (
    "model",
    "output_dir",
    "seed",
    "resume",
    "stop_at_step",
    "local_rank",
    "max_tokens",
    "export",
    "data_cache",
    "ds_config",
)
"""cpt.py options the study sets itself for every cell (the rest are the study's to choose)."""
FUSE_OWNED = ("model", "out", "force", "quiet", "verify")
EMBEDDED_SET = "embedded"
"""The ppl set name of the embedded Wikipedia sample's held-out slice (the in-domain set)."""


def is_named_set(ppl_set: str) -> bool:
    """A shipped evaluation set's name (``deus_dist.embedded.EVAL_SETS``), not a path."""
    from deus_dist.embedded import EVAL_SETS

    return ppl_set in EVAL_SETS


def set_label(ppl_set: str) -> str:
    """What reports, plots and file names call a set: its name, or its file's stem."""
    if is_named_set(ppl_set):
        return ppl_set
    stem = Path(ppl_set).expanduser().stem or Path(ppl_set).name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


@dataclass(frozen=True)
class Stage:
    fuse: dict
    """tools/fuse_layers.py options (method, num_new, placement, ...)."""
    train: dict
    """launchers/cpt.py options: the study's shared ones with this arm's and stage's on top; its
    max_steps is the stage's nominal length (the budget scales it)."""


@dataclass(frozen=True)
class Arm:
    name: str
    stages: tuple[Stage, ...]


@dataclass
class Study:
    base: str | None
    train: dict
    budget: str
    seeds: list[int]
    baseline: str
    arms: list[Arm]
    eval_ppl: list[str] = field(default_factory=lambda: [EMBEDDED_SET])
    eval_tasks: list[str] = field(default_factory=list)
    eval_include_path: str | None = None
    """A folder of the user's own lm-eval task definitions (eval_tasks.py --include_path), absolute."""
    task_limit: int | None = None
    ppl_tokens: int = 16384
    ppl_seq_len: int = 256
    sft: dict | None = None
    """sft.py options: when given, every cell instruction-tunes its final model the same way."""

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def _fields(cls) -> dict:
    return typing.get_type_hints(cls)


def _options(values, cls, owned, where: str, problems: Problems, hint: str = "") -> dict:
    """``values`` checked as options of ``cls`` (types converted), naming ``where`` for problems
    (``hint`` follows the message for an unknown option)."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        problems.append(f"{where}: expected a mapping of option names to values, got {values!r}")
        return {}
    hints, out = _fields(cls), {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key in owned:
            problems.append(f"{where}: {key!r} is set by the study for every cell; remove it")
        elif key not in hints:
            problems.append(f"{where}: unknown option {key!r}{hint}")
        else:
            out[key] = problems.attempt(lambda k=key, v=value: convert_value(v, hints[k], f"{where}: {k}"))
    return out


def _check_fuse(options: dict, where: str, problems: Problems) -> None:
    from deus_dist.methods import get_method, unused_options

    method = problems.attempt(lambda: get_method(options.get("method", FuseConfig.method)))
    if method is not None:
        cfg = FuseConfig(**options)
        problems.items += [f"{where}: {p}" for p in unused_options(method, cfg)]


def parse_study(data: dict, source: str = "--config") -> Study:
    problems = Problems()
    for key in data:
        if key not in STUDY_KEYS:
            problems.append(f"{source}: unknown key {key!r}; valid keys: {', '.join(STUDY_KEYS)}")
    train = _options(data.get("train"), TrainConfig, TRAIN_OWNED, f"{source}: train", problems)
    sft = (
        _options(data.get("sft"), SftConfig, TRAIN_OWNED, f"{source}: sft", problems)
        if "sft" in data
        else None
    )
    budget = data.get("budget", "tokens")
    if budget not in BUDGETS:
        problems.append(f"{source}: budget {budget!r} is not one of {', '.join(BUDGETS)}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        problems.append(f"{source}: seeds must be a non-empty list of integers, got {seeds!r}")
        seeds = [0]
    if len(set(seeds)) != len(seeds):
        problems.append(f"{source}: seeds {seeds} repeat a seed")
    ev = data.get("eval") or {}
    if not isinstance(ev, dict):
        problems.append(f"{source}: eval must be a mapping with keys {', '.join(EVAL_KEYS)}")
        ev = {}
    for key in ev:
        if key not in EVAL_KEYS:
            problems.append(f"{source}: eval: unknown key {key!r}; valid keys: {', '.join(EVAL_KEYS)}")
    ppl_sets = ev.get("ppl", [EMBEDDED_SET]) or []
    from deus_dist.embedded import EVAL_SETS

    labels: dict[str, str] = {}
    for s in map(str, ppl_sets):
        if not is_named_set(s) and not Path(s).expanduser().exists():
            problems.append(
                f"{source}: eval: ppl set {s} does not exist (a text file or folder, or a named set: "
                f"{', '.join(EVAL_SETS)})"
            )
        label = set_label(s)
        if label in labels:
            problems.append(
                f"{source}: eval: ppl sets {labels[label]} and {s} are both called {label!r} in the "
                "report; rename one file"
            )
        labels[label] = s
    tasks = ev.get("tasks") or []
    include_path = ev.get("include_path")
    if include_path is not None:
        include_path = str(Path(str(include_path)).expanduser().resolve())
    if tasks:
        from deus_dist.eval.tasks import resolve_tasks

        problems.attempt(
            lambda: resolve_tasks(
                ",".join(map(str, tasks)),
                f"{source}: eval: tasks",
                include_path=include_path,
                include_option=f"{source}: eval: include_path",
            )
        )
    elif include_path is not None:
        problems.append(f"{source}: eval: include_path is given but eval: tasks names none of its tasks")
    arms, names = [], []
    raw_arms = data.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        problems.append(f"{source}: arms must be a non-empty list")
        raw_arms = []
    for i, raw in enumerate(raw_arms):
        if not isinstance(raw, dict) or "name" not in raw:
            problems.append(f"{source}: arms[{i}] needs a name")
            continue
        name = str(raw["name"])
        where = f"{source}: arm {name!r}"
        if name in names:
            problems.append(f"{where}: the name is used twice")
        names.append(name)
        arm_train = _options(raw.get("train"), TrainConfig, TRAIN_OWNED, f"{where}: train", problems)
        stage_specs = raw.get("stages")
        if stage_specs is None:
            stage_specs = [{k: v for k, v in raw.items() if k not in ("name", "train")}]
        elif set(raw) - {"name", "stages", "train"}:
            extra = sorted(set(raw) - {"name", "stages", "train"})
            problems.append(f"{where}: with stages, fuse options go in each stage, not beside them: {extra}")
        if not isinstance(stage_specs, list) or not stage_specs:
            problems.append(f"{where}: stages must be a non-empty list")
            continue
        stages = []
        for j, spec in enumerate(stage_specs):
            swhere = where if len(stage_specs) == 1 and "stages" not in raw else f"{where} stage {j + 1}"
            if not isinstance(spec, dict):
                problems.append(f"{swhere}: expected a mapping of fuse_layers.py options")
                continue
            fuse = _options(
                {k: v for k, v in spec.items() if k != "train"},
                FuseConfig,
                FUSE_OWNED,
                swhere,
                problems,
                hint=" (fuse_layers.py options, or train: {...})",
            )
            _check_fuse(fuse, swhere, problems)
            stage_train = _options(spec.get("train"), TrainConfig, TRAIN_OWNED, f"{swhere}: train", problems)
            merged = {**train, **arm_train, **stage_train}
            if not merged.get("max_steps"):
                problems.append(f"{swhere}: no max_steps (in train: or the stage's train:)")
            stages.append(Stage(fuse, merged))
        arms.append(Arm(name, tuple(stages)))
    baseline = data.get("baseline", names[0] if names else None)
    if baseline not in names:
        problems.append(f"{source}: baseline {baseline!r} is not an arm (arms: {', '.join(names)})")
    for key in ("task_limit", "ppl_tokens", "ppl_seq_len"):
        if key in ev and (not isinstance(ev[key], int) or ev[key] < 1):
            problems.append(f"{source}: eval: {key} must be a positive integer, got {ev[key]!r}")
    problems.raise_if_any()
    return Study(
        base=data.get("base"),
        train=train,
        budget=budget,
        seeds=list(seeds),
        baseline=baseline,
        arms=arms,
        eval_ppl=[str(s) for s in ppl_sets],
        eval_tasks=[str(t) for t in tasks],
        eval_include_path=include_path,
        task_limit=ev.get("task_limit"),
        ppl_tokens=ev.get("ppl_tokens", 16384),
        ppl_seq_len=ev.get("ppl_seq_len", 256),
        sft=sft,
    )


def load_study(path: str) -> Study:
    return parse_study(load_yaml(path), f"--config {path}")


def as_dict(study: Study) -> dict:
    return dataclasses.asdict(study)


__all__ = ["Arm", "Stage", "Study", "load_study", "parse_study", "as_dict", "UserError"]
