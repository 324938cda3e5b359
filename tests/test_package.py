"""deus-dist as a package: extras by use, console scripts, and a wheel installed away from the checkout.

The fast tests check that up-scaling needs none of the extras (they are made unimportable in a child
process) and that each other entry point then says, in one line, which extra to install. The slow
one builds a wheel from the tracked files, installs it into a fresh virtualenv outside the checkout
(system site packages for the dependencies, nothing downloaded) and runs ``deus-fuse`` and a 2-step
CPU ``deus-cpt`` with the default ``--ds_config`` from another directory.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, add_char_tokenizer, launch_env, make_tiny, write_wiki_jsonl

ENTRY_POINTS = {
    # console script: (module, the extra it needs or None)
    "deus-fuse": ("deus_dist.cli.fuse", None),
    "deus-cpt": ("deus_dist.cli.train", "train"),
    "deus-sft": ("deus_dist.cli.sft", "train"),
    "deus-prepare-data": ("deus_dist.cli.prepare_data", "train"),
    "deus-export": ("deus_dist.cli.export", "train"),
    "deus-eval-ppl": ("deus_dist.cli.eval_ppl", "eval"),
    "deus-eval-tasks": ("deus_dist.cli.eval_tasks", "eval"),
    "deus-study": ("deus_dist.cli.study", "study"),
    "deus-plan-memory": ("deus_dist.cli.plan_memory", None),
}


def setup_kwargs() -> dict:
    """What setup.py passes to setuptools.setup (read by running it with setup() captured)."""
    import setuptools

    captured = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(REPO / "setup.py"))
    finally:
        setuptools.setup = real
    return captured


def test_console_scripts_and_extras_match_setup_py():
    from packaging.requirements import Requirement

    from deus_dist.extras import EXTRAS

    kw = setup_kwargs()
    scripts = dict(s.split("=") for s in kw["entry_points"]["console_scripts"])
    assert scripts == {name: f"{module}:main" for name, (module, _) in ENTRY_POINTS.items()}
    extras = kw["extras_require"]
    for extra, modules in EXTRAS.items():
        assert {Requirement(r).name for r in extras[extra]} == set(modules.values()), extra
    assert set(extras["all"]) == set(extras["train"]) | set(extras["eval"]) | set(extras["study"])
    base = {Requirement(r).name for r in kw["install_requires"]}
    assert not base & {"deepspeed", "datasets", "lm-eval", "matplotlib"}  # fusing needs none
    (deepspeed,) = [Requirement(r) for r in extras["train"] if r.startswith("deepspeed")]
    assert str(deepspeed.specifier) in ("<0.20,>=0.19.3", ">=0.19.3,<0.20")
    for pattern in kw["package_data"]["deus_dist"]:  # every packaged file pattern matches files
        assert list((REPO / "deus_dist").glob(pattern)), pattern


BLOCKED = ("deepspeed", "datasets", "lm_eval", "matplotlib")
CHILD = """
import contextlib, io, json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # import fails, importlib.util.find_spec says missing
import importlib
out = {{}}
for module in {modules!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = importlib.import_module(module).main(["--help"])
        except SystemExit as e:
            status = e.code
    out[module] = [status, err.getvalue()]
from deus_dist.cli.fuse import main
fused = io.StringIO()
with contextlib.redirect_stderr(fused), contextlib.redirect_stdout(fused):
    status = main(["--model", sys.argv[1], "--out", sys.argv[2], "--num_new", "2", "--quiet"])
out["fuse"] = [status, fused.getvalue()]
print(json.dumps(out))
"""


def test_fusing_needs_no_extra_and_other_tools_name_theirs(tmp_path):
    """With deepspeed, datasets, lm-eval and matplotlib unimportable, fuse_layers.py up-scales (and
    --quiet prints nothing, no "Loading weights" bar from the verification); every other entry point
    exits 2 with one line naming the extra to install."""
    base = make_tiny(tmp_path / "base")
    modules = [m for m, extra in ENTRY_POINTS.values() if extra]
    code = CHILD.format(blocked=BLOCKED, modules=modules)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(base), str(tmp_path / "up")],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("fuse") == [0, ""]
    assert json.loads((tmp_path / "up" / "deus_manifest.json").read_text())["num_layers_after"] == 8
    for name, (module, extra) in ENTRY_POINTS.items():
        if extra is None:
            continue
        status, err = out[module]
        assert status == 2, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert f"pip install 'deus-dist[{extra}]'" in err, (name, err)


def copy_checkout(dst: Path) -> Path:
    """The files git knows (tracked, or new and not ignored) copied to ``dst``, links as links: what a
    clean clone holds, so the wheel is built from nothing the checkout's builds left behind."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src, out = REPO / rel, dst / rel
        if not src.is_symlink() and not src.is_file():
            continue  # deleted in the working tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        else:
            shutil.copy2(src, out)
    return dst


def run(cmd, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.distributed
def test_a_wheel_installed_outside_the_checkout_fuses_and_trains(tmp_path):
    """pip wheel, a fresh virtualenv outside the checkout, the wheel installed into it (its
    deus_dist, not the editable checkout's), then from another directory: deus-fuse on a tiny model,
    a 2-step CPU deus-cpt with the default --ds_config (the packaged zero3_cpu.json), the module
    on 2 ranks under DeepSpeed's launcher (--module, as the study starts it), and the default study's
    dry run (the packaged studies/default.yaml, every command a module)."""
    src = copy_checkout(tmp_path / "src")
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in launch_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"  # nothing is downloaded: the system site has every dependency
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src],
        tmp_path,
        env,
    )
    (wheel,) = wheels.glob("deus_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "ds_configs/zero3_cpu.json",
        "studies/default.yaml",
        "slurm/cpt.sbatch",
        "architectures/llama.json",
    ):
        assert f"deus_dist/{shipped}" in names, shipped

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path, env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    run([python, "-m", "pip", "install", "-q", "--no-deps", wheel], tmp_path, env)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([python, "-c", "import deus_dist; print(deus_dist.__file__)"], elsewhere, env).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout

    base = make_tiny(tmp_path / "base")
    add_char_tokenizer(base)
    data = write_wiki_jsonl(tmp_path / "wiki.jsonl", articles=4, chars=3000)
    run(
        [bin_dir / "deus-fuse", "--model", base, "--out", elsewhere / "up", "--num_new", "3", "--quiet"],
        elsewhere,
        env,
    )
    assert json.loads((elsewhere / "up" / "deus_manifest.json").read_text())["num_layers_after"] == 9

    train = run(
        [
            bin_dir / "deus-cpt",
            "--model",
            "up",
            "--data",
            data,
            "--output_dir",
            "run",
            "--max_steps",
            "2",
            "--seq_len",
            "64",
            "--micro_batch",
            "2",
            "--warmup_steps",
            "0",
            "--eval_batches",
            "1",
        ],
        elsewhere,
        env,
    )
    steps = [
        json.loads(line)["step"] for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]
    assert (elsewhere / "run" / "final" / "deus_manifest.json").is_file()
    assert str(REPO) not in train.stdout + train.stderr  # nothing was read from the checkout

    # the study's form with several ranks: DeepSpeed's launcher starting the module on 2 CPU ranks
    from deus_dist.ports import free_port

    ranks = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port()]
    run(
        [
            *ranks,
            "--module",
            "deus_dist.cli.train",
            "--model",
            "up",
            "--data",
            data,
            "--output_dir",
            "run2",
            "--max_steps",
            "1",
            "--seq_len",
            "64",
            "--micro_batch",
            "1",
            "--eval_batches",
            "1",
            "--quiet",
        ],
        elsewhere,
        env,
    )
    assert (elsewhere / "run2" / "final" / "deus_manifest.json").is_file()

    study = run(
        [bin_dir / "deus-study", "--dry_run", "--quick", "--out", elsewhere / "study"], elsewhere, env
    )
    plan = json.loads((elsewhere / "study" / "plan.json").read_text())
    commands = json.dumps(plan)
    assert "-m deus_dist.cli.fuse" in study.stdout and "--module deus_dist.cli.train" in study.stdout
    packaged = Path(where).parent / "ds_configs" / "zero3_cpu.json"
    assert str(REPO) not in commands and f"--ds_config {packaged} " in commands  # the wheel's config
