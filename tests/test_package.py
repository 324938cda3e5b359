"""deus-dist as a package: extras by use, console scripts, and a wheel installed away from the checkout.

The fast tests check that up-scaling needs none of the extras (they are made unimportable in a child
process) and that each other entry point then says, in one line, which extra to install. The slow
one builds a wheel from the tracked files, installs it into a fresh virtualenv outside the checkout
(system site packages for the dependencies, nothing downloaded) and runs ``deus-fuse`` and a 2-step
CPU ``deus-cpt`` with the default ``--ds_config`` from another directory.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys

from conftest import REPO, launch_env, make_tiny

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
