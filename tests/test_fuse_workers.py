"""New blocks made in parallel (worker processes, torchrun ranks) give the checkpoint that one
worker writes, byte for byte; bad settings are refused before anything is written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, fuse, launch, make_tiny
from deus_dist.errors import UserError


def files_without_timings(out: Path) -> dict[str, bytes]:
    """Every file of a checkpoint; the manifest without what differs from run to run (its creation
    time and the seconds each solve took)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    manifest = json.loads(files.pop("deus_manifest.json"))
    manifest.pop("created")
    for spaces in manifest["diagnostics"].values():
        for report in spaces.values():
            report.pop("seconds")
            report.pop("cost_seconds", None)
    files["deus_manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


SHARDS = ("--out_shard_size", "300KB")  # several output shards


@pytest.fixture
def base(tmp_path):
    return make_tiny(tmp_path / "base", num_hidden_layers=6, max_shard_size="200KB")


def test_worker_processes_write_what_one_worker_writes(base, tmp_path):
    assert fuse("--model", base, "--out", tmp_path / "one", "--workers", "1", *SHARDS, "--quiet") == 0
    assert fuse("--model", base, "--out", tmp_path / "two", "--workers", "2", *SHARDS, "--quiet") == 0
    one, two = files_without_timings(tmp_path / "one"), files_without_timings(tmp_path / "two")
    assert any(name.startswith("model-00002") for name in one)  # several shards
    assert one == two


@pytest.mark.distributed
def test_torchrun_ranks_write_what_one_worker_writes(base, tmp_path):
    assert fuse("--model", base, "--out", tmp_path / "one", *SHARDS, "--quiet") == 0
    args = ["--model", base, "--out", tmp_path / "ranks", *SHARDS]
    proc = launch(args, "torchrun", nproc=2, script=REPO / "tools" / "fuse_layers.py")
    assert "2 worker(s) (torchrun ranks" in proc.stdout
    assert files_without_timings(tmp_path / "one") == files_without_timings(tmp_path / "ranks")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "2", "--ot_cost", "activations"], "--workers: --ot_cost activations"),
    ],
)
def test_bad_worker_settings(base, tmp_path, capsys, args, needle):
    assert fuse("--model", base, "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("error:") == 1
    assert not (tmp_path / "out").exists()


def test_more_workers_than_memory_allows_is_refused_with_the_figures(base, tmp_path, capsys, monkeypatch):
    from deus_dist import workers
    from deus_dist.configs import FuseConfig
    from deus_dist.upscale import validate

    per_worker = validate(FuseConfig(model=str(base), out=str(tmp_path / "out"))).workers.per_worker_bytes
    # A machine whose free memory holds one worker's blocks and cost, not two.
    monkeypatch.setattr(workers, "available_memory", lambda device: int(1.5 * per_worker / 0.9))
    assert fuse("--model", base, "--out", tmp_path / "out", "--workers", "2") == 2
    err = capsys.readouterr().err
    assert "--workers 2: each worker needs about" in err and "use --workers 1" in err
    assert not (tmp_path / "out").exists()
    # The default takes what fits.
    assert fuse("--model", base, "--out", tmp_path / "out", "--quiet") == 0


def test_cuda_without_a_gpu_names_the_option(base, tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert fuse("--model", base, "--out", tmp_path / "out", "--device", "cuda") == 2
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err


def children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_run_leaves_no_output_and_no_worker(tmp_path, sig):
    base = make_tiny(tmp_path / "base", hidden_size=256, intermediate_size=2048, num_hidden_layers=8)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "fuse_layers.py"), "--model", str(base), "--out", str(out)]
    proc = subprocess.Popen([*cmd, "--workers", "2", "--quiet"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    workers = set()
    while time.time() < deadline and len(workers) < 2:
        assert proc.poll() is None, "finished before it could be stopped"
        workers = {p for p in children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()}
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not out.exists()
    deadline = time.time() + 30  # a worker notices a dead writer within seconds
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in workers)
    if sig == signal.SIGTERM:
        assert not list(tmp_path.glob(".out.partial-*"))


def test_each_gpu_holds_one_worker(base, tmp_path, monkeypatch):
    """On GPUs the workers do not share memory: eight GPUs with room for one worker each take one
    worker each (simulated: the device count and free memory are what this machine reports)."""
    import torch

    from deus_dist import workers
    from deus_dist.configs import FuseConfig
    from deus_dist.upscale import validate

    per_worker = validate(FuseConfig(model=str(base), out=str(tmp_path / "out"))).workers.per_worker_bytes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(workers, "available_memory", lambda device: int(1.5 * per_worker / 0.9))
    plan = validate(FuseConfig(model=str(base), out=str(tmp_path / "out"), device="cuda")).workers
    assert plan.count == 3 and plan.devices == ["cuda:0", "cuda:1", "cuda:2"]  # one per new block
    explicit = validate(FuseConfig(model=str(base), out=str(tmp_path / "out"), device="cuda", workers=3))
    assert explicit.workers.count == 3
    monkeypatch.setattr(workers, "available_memory", lambda device: per_worker // 2)
    with pytest.raises(
        UserError, match="free on the smallest GPU, room for 0; use a machine with more memory"
    ):
        validate(FuseConfig(model=str(base), out=str(tmp_path / "out"), device="cuda"))
