"""Cluster paths simulated on one machine: two "nodes" on loopback (DeepSpeed's multi-node launcher
and torchrun), node-local and shared directories, and the shipped SLURM batch scripts run
unchanged under a stand-in SLURM (tests/slurm_standin).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO,
    launch_env,
    launch_nodes,
    make_tiny,
    node_cmds,
    read_metrics,
    state_dict,
    train_args,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STANDIN = REPO / "tests" / "slurm_standin"


def test_once_per_filesystem_on_two_simulated_nodes(tmp_path):
    """4 ranks as 2 "nodes" x 2 with a 2-second collective timeout (tests/helpers/once_per_filesystem.py)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "4",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_port()),
        str(REPO / "tests" / "helpers" / "once_per_filesystem.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(4)]
    # a directory every rank sees: built once, by rank 0; all ranks read rank 0's result
    assert [r["shared"] for r in reports] == ["0"] * 4
    # node-local scratch: built once per node, by each node's first rank
    assert [r["local"] for r in reports] == ["0", "0", "2", "2"]
    assert [r["built"] for r in reports] == [["shared", "node-0", "slow"], [], ["node-1"], []]
    # a build three times longer than the collective timeout: the others waited on a marker file
    assert [r["slow"] for r in reports] == ["0"] * 4
    # a failed build stops every rank with the builder's message; only the builder prints it
    assert all(r["failure"]["message"] == "--data: the builder could not read corpus.jsonl" for r in reports)
    assert [r["failure"]["reported_by_me"] for r in reports] == [True, False, False, False]
    # node-local directories are refused where a shared one is needed
    assert all(
        "--output_dir: " in r["local_shared"] and "shared by all nodes" in r["local_shared"] for r in reports
    )
    assert "rank(s) 2, 3 do not see" in reports[0]["local_shared"]


def _port() -> int:
    from deus_dist.ports import free_port

    return free_port()


def _ok(procs) -> None:
    for p in procs:
        assert p.returncode == 0, f"{p.args[:12]}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_nodes_train_and_resume(train_setup, uninterrupted, launcher):
    """Two launchers, one per "node" (1 rank each), as on a cluster: each node packs the data into
    its own node-local --data_cache; training stops at step 3 and resumes to 6, equal to the
    single-launcher run with the same global batch."""
    root = train_setup[0]
    run = f"two-nodes-{launcher}"

    def args(*extra):
        return lambda node: train_args(
            train_setup, run, "--max_steps", "6", *extra, cache=f"node{node}-scratch"
        )

    first = launch_nodes(node_cmds(args("--grad_accum", "2", "--stop_at_step", "3"), launcher))
    _ok(first)
    assert "stopped at --stop_at_step 3" in first[0].stdout
    for node in (0, 1):  # node-local caches: each node's first rank built its own
        assert len(list((root / f"node{node}-scratch").iterdir())) == 1
    assert [r["step"] for r in read_metrics(root / run)] == [1, 2, 3]
    second = launch_nodes(node_cmds(args(), launcher))
    _ok(second)
    assert "resumed from" in second[0].stdout
    a, b = read_metrics(uninterrupted), read_metrics(root / run)
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), (ra, rb)
    wa, wb = state_dict(uninterrupted / "final"), state_dict(root / run / "final")
    assert all(torch.allclose(wa[n], wb[n], rtol=1e-4, atol=1e-6) for n in wa)


def test_output_dir_on_node_local_disks_is_refused(train_setup):
    """Each "node" gets its own --output_dir (what a node-local path is on a real cluster): the
    ranks find out at start-up, before any training, and stop with one message."""
    root = train_setup[0]
    procs = launch_nodes(
        node_cmds(
            lambda node: train_args(
                train_setup, f"local-out-{node}", "--grad_accum", "2", "--max_steps", "2"
            ),
            "deepspeed",
        ),
        timeout=300,
    )
    assert [p.returncode for p in procs] == [2, 2], [p.stderr[-2000:] for p in procs]
    assert "--output_dir: " in procs[0].stderr and "filesystem shared by all nodes" in procs[0].stderr
    assert not (root / "local-out-0" / "checkpoints").exists()


def standin_env(tmp_path: Path, **extra) -> dict:
    state = tmp_path / "slurm"
    state.mkdir()
    (state / "next-job-id").write_text(str(_port() - 20000))  # the batch script's port: 20000 + id
    env = launch_env()
    env.pop("MASTER_ADDR", None)
    env.update(PATH=f"{STANDIN}{os.pathsep}{env['PATH']}", SLURM_STANDIN_DIR=str(state), **extra)
    return env


def events(tmp_path: Path) -> list[str]:
    return [
        " ".join(line.split()[1:]) for line in (tmp_path / "slurm" / "events.log").read_text().splitlines()
    ]


def test_slurm_batch_script_requeues_on_the_time_limit_and_finishes(train_setup, uninterrupted, tmp_path):
    """launchers/slurm/cpt.sbatch, unchanged, as a 2-node x 1-task job: the time-limit SIGTERM
    arrives after step 2, every task saves and exits 3, the script requeues the job, the second
    attempt resumes and finishes (exit 0, no requeue), and the weights equal an uninterrupted run's."""
    root = train_setup[0]
    run = root / "slurm-run"
    env = standin_env(
        tmp_path,
        DS_CONFIG=str(REPO / "ds_configs" / "zero3_cpu.json"),
        SLURM_STANDIN_TIME_LIMIT_WHEN=f"{run / 'metrics.jsonl'}:2",
    )
    # the script names --ds_config itself (DS_CONFIG); every attempt runs the same command
    args = [str(a) for a in train_args(train_setup, "slurm-run", "--grad_accum", "2", "--max_steps", "6")[2:]]
    proc = subprocess.run(
        [
            "sbatch",
            "--nodes=2",
            "--ntasks-per-node=1",
            f"--output={tmp_path}/job-%j.out",
            str(REPO / "launchers" / "slurm" / "cpt.sbatch"),
            *args,
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (log,) = tmp_path.glob("job-*.out")
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    kinds = [e.split()[0] for e in events(tmp_path)]
    assert kinds == ["start", "signal", "step-exit", "requeue", "exit", "start", "step-exit", "exit"], events(
        tmp_path
    )
    step_exits = [e for e in events(tmp_path) if e.startswith("step-exit")]
    assert step_exits[0].split()[2] == "3" and step_exits[1].split()[2] == "0"
    assert "requeueing job" in output and "stopped on a signal after step" in output
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    a = read_metrics(uninterrupted)
    for ra, rb in zip(a, records, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), (ra, rb)
    wa, wb = state_dict(uninterrupted / "final"), state_dict(run / "final")
    assert all(torch.allclose(wa[n], wb[n], rtol=1e-4, atol=1e-6) for n in wa)


def test_slurm_fuse_script_runs_the_fuse_tool(tmp_path):
    base = make_tiny(tmp_path / "base")
    out = tmp_path / "up"
    proc = subprocess.run(
        [
            "sbatch",
            f"--output={tmp_path}/fuse-%j.out",
            str(REPO / "launchers" / "slurm" / "fuse.sbatch"),
            "--model",
            str(base),
            "--out",
            str(out),
            "--num_new",
            "2",
            "--quiet",
        ],
        env=standin_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert [e.split()[0] for e in events(tmp_path)] == ["start", "step-exit", "exit"]
    assert events(tmp_path)[-1].endswith("status 0"), [p.read_text() for p in tmp_path.glob("fuse-*.out")]
    assert json.loads((out / "deus_manifest.json").read_text())["num_layers_after"] == 8
