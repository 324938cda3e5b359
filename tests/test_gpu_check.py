"""tools/gpu_check.sh: it parses, and its CPU dry run goes through every step of the GPU check."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO, launch_env

SCRIPT = REPO / "tools" / "gpu_check.sh"


def test_gpu_check_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_CUDA_ARCH_LIST=9.0" in SCRIPT.read_text()


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out"), "--cpu-dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        env=launch_env(),
        cwd=REPO,
    )
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    failed = {s["step"]: s["log_tail"] for s in report["steps"] if s["rc"]}
    assert proc.returncode == 0 and not failed, failed or proc.stdout[-3000:]
    assert [s["step"] for s in report["steps"]] == [
        "test_gpu",
        "prepare",
        "cpt_uninterrupted",
        "cpt_sigterm",
        "cpt_resume",
        "cpt_resume_equals_uninterrupted",
        "sft_packing",
        "bench_train",
        "plan_vs_peak",
        "fuse_cuda",
    ]
    # the signal stopped the run part-way; the resumed run's 30 losses are the uninterrupted run's
    assert report["cpt_resume"]["steps"] == report["cpt_resume"]["resumed_steps"] == 30
    assert report["cpt_resume"]["max_rel_loss_diff"] <= 2e-3
    runs = {r["run"] for r in report["bench"]["results"]}
    assert {"plain:top", "engine:top", "engine-z2:top", "engine-z1:top"} <= runs
    assert {r["run"] for r in report["plan_vs_peak"]} >= {"engine:top", "engine-z2:top", "engine-z1:top"}
    table = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert "cpt_resume_equals_uninterrupted" in table and "plan vs peak" in table
