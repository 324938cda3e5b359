"""tools/gpu_check.sh: it parses, and its CPU dry run goes through every step of the GPU check."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

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
        "zeropp_logits",
        "fuse_cuda",
    ]
    # the signal stopped the run part-way; the resumed run's 30 losses are the uninterrupted run's
    assert report["cpt_resume"]["steps"] == report["cpt_resume"]["resumed_steps"] == 30
    assert report["cpt_resume"]["max_rel_loss_diff"] <= 2e-3
    runs = {r["run"] for r in report["bench"]["results"]}
    assert {"plain:top", "engine:top", "engine-z2:top", "engine-z1:top", "engine-z0:top"} <= runs
    assert {r["run"] for r in report["plan_vs_peak"]} >= {"engine:top", "engine-z2:top", "engine-z1:top"}
    # DeepSpeed's quantizer is CUDA-only: here the comparison's code runs with ZeRO++ off on both sides
    assert report["zeropp"]["quantized"] is False and report["zeropp"]["max_abs_logit_change"] == 0
    # which kernels the packed-conversation paths had
    import importlib.util

    from deus_dist.train.model import PACKED_SEQUENCE_KERNELS

    kernels = {k: importlib.util.find_spec(k) is not None for k in ("flash_attn", *PACKED_SEQUENCE_KERNELS)}
    assert report["kernels"] == kernels
    table = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert "cpt_resume_equals_uninterrupted" in table and "plan vs peak" in table
    assert "optional kernels: " + (", ".join(k for k, v in kernels.items() if v) or "none") in table


def test_bench_train_measures_each_run_in_its_own_process_over_rounds(tmp_path):
    """tools/bench_train.py's default: a process per run and round, the order reversed every other
    round; the ratio is the median of the rounds' own ratios."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "tools" / "bench_train.py"), "--shape", "small", "--runs"]
    cmd += ["plain:top,engine-z2:top", "--steps", "1", "--warmup", "0", "--rounds", "2"]
    cmd += ["--seq_len", "32", "--micro_batch", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=launch_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [list(r) for r in report["rounds"]] == [
        ["plain:top", "engine-z2:top"],
        ["engine-z2:top", "plain:top"],
    ]
    per_round = report["ratios_per_round"]["engine-z2:top / plain:top"]
    assert len(per_round) == 2 and all(x > 0 for x in per_round)
    assert report["ratios"]["engine-z2:top / plain:top"] == pytest.approx(statistics.median(per_round))
    assert [r["run"] for r in report["results"]] == ["plain:top", "engine-z2:top"]
    assert "engine-z2:top / plain:top" in proc.stdout and "(rounds: " in proc.stdout
