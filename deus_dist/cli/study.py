"""``tools/study.py``: which growth recipe wins, at equal data and equal compute, with error bars."""

from __future__ import annotations

import sys

from deus_dist.cli.args import tool_main
from deus_dist.configs import StudyConfig
from deus_dist.extras import requires

DESCRIPTION = """\
Compares ways of growing a model (method, placement, how many blocks, one stage or several) at an
equal budget of tokens, training FLOPs or seconds, over several seeds, with the project's own
tools: every cell (arm x seed) runs tools/fuse_layers.py, launchers/cpt.py (and launchers/sft.py),
tools/eval_ppl.py and tools/eval_tasks.py exactly as a user would. Writes STUDY_DIR/plan.json,
one folder per cell (keyed by a hash of its settings: reruns skip finished cells and continue
interrupted ones), and STUDY_DIR/report.md / report.json / plots: perplexity per set with 95%
intervals over seeds, the paired difference to the baseline with a bootstrap interval ("no
difference" when it contains zero), per evaluation set, task accuracies, speed and memory. eval:
ppl takes files and the shipped sets by name (embedded: the held-out tenth of the training
sample; chat, science, code: other domains; see tools/eval_ppl.py --help); the default study
scores all four.

examples:
  python tools/study.py                                   # studies/default.yaml: 2 x 2, three seeds
  python tools/study.py --quick                           # a smoke run: one seed, half the steps
  python tools/study.py --config studies/mine.yaml --dry_run
  python tools/study.py --config studies/mine.yaml --launcher slurm --sbatch_args "--nodes=1"
"""


def run(cfg: StudyConfig, log=print):
    from deus_dist.study.run import run as run_study

    return run_study(cfg, log)


@requires("study", "study.py")
def main(argv: list[str] | None = None) -> int:
    return tool_main("study.py", StudyConfig, DESCRIPTION, run, argv)


if __name__ == "__main__":
    sys.exit(main())
