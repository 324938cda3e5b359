"""Every bad input gets one clear error naming the option, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from conftest import REPO, fuse, make_tiny


def error_of(capsys, *args) -> str:
    capsys.readouterr()  # drop what the fixtures printed
    assert fuse(*args) == 2
    err = capsys.readouterr().err
    assert "fuse_layers.py: error:" in err and "Traceback" not in err
    return err[err.index("fuse_layers.py: error:") :]


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or p.name == "out")


def test_missing_model_path(tmp_path, capsys):
    err = error_of(capsys, "--model", tmp_path / "nope", "--out", tmp_path / "out")
    assert "--model" in err and "does not exist" in err


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error_of(capsys, "--model", tmp_path / "empty", "--out", tmp_path / "out")


def test_shard_listed_but_missing(tmp_path, capsys):
    base = make_tiny(tmp_path / "base", max_shard_size="200KB")
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    shard.unlink()
    err = error_of(capsys, "--model", base, "--out", tmp_path / "out")
    assert "--model" in err and shard.name in err and "missing" in err


def test_truncated_shard(tmp_path, capsys):
    base = make_tiny(tmp_path / "base", max_shard_size="200KB")
    shard = sorted(base.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    err = error_of(capsys, "--model", base, "--out", tmp_path / "out")
    assert "--model" in err and shard.name in err and "truncated" in err
    assert leftovers(tmp_path) == []


def test_gpt2_attention_scaled_by_layer_index_is_refused(tmp_path, capsys):
    """GPT-2's scale_attn_by_inverse_layer_idx ties each layer's function to its index: inserting
    layers would change the layers above, so the up-scaled model would not compute the base's."""
    base = make_tiny(tmp_path / "base", "gpt2", scale_attn_by_inverse_layer_idx=True)
    err = error_of(capsys, "--model", base, "--out", tmp_path / "out", "--method", "llama-pro")
    assert "scale_attn_by_inverse_layer_idx=True" in err and "1/(its index + 1)" in err
    assert leftovers(tmp_path) == []


def test_corrupt_header(tmp_path, capsys):
    base = make_tiny(tmp_path / "base")
    (base / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert "corrupt" in error_of(capsys, "--model", base, "--out", tmp_path / "out")


def test_unsupported_architecture(tmp_path, capsys):
    base = make_tiny(tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(architectures=["FalconForCausalLM"], model_type="falcon")
    (base / "config.json").write_text(json.dumps(cfg))
    err = error_of(capsys, "--model", base, "--out", tmp_path / "out")
    assert (
        "unsupported architecture FalconForCausalLM" in err
        and "LlamaForCausalLM" in err
        and "Qwen3ForCausalLM" in err
        and "Olmo2ForCausalLM" in err
    )
    assert "deus_dist/architectures/<family>.json" in err  # the file to add


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--num_new", "0"], "--num_new must be at least 1"),
        (["--num_new", "6"], "--num_new 6"),
        (["--positions", "5"], "--positions: [5] out of range"),
        (["--positions", "1,3,1"], "--positions: [1] repeated"),
        (["--method", "solar", "--placement", "top"], "--placement/--positions"),
        (["--method", "nope"], "--method: unknown method 'nope'"),
        (["--out_shard_size", "huge"], "--out_shard_size"),
        (["--num_new", "x"], "--num_new: invalid value"),
    ],
)
def test_impossible_options(tiny_llama, tmp_path, capsys, args, needle):
    err = error_of(capsys, "--model", tiny_llama, "--out", tmp_path / "out", *args)
    assert needle in err
    assert leftovers(tmp_path) == []


def test_all_problems_reported_at_once(tmp_path, capsys):
    err = error_of(capsys, "--model", tmp_path / "nope", "--method", "nope", "--out_shard_size", "x")
    assert "3 problems" in err and "--model" in err and "--method" in err and "--out_shard_size" in err


def test_out_inside_model(tiny_llama, capsys):
    err = error_of(capsys, "--model", tiny_llama, "--out", tiny_llama / "sub")
    assert "--out" in err and "inside --model" in err
    assert not (tiny_llama / "sub").exists()


def test_existing_out_needs_force(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert "--force" in error_of(capsys, "--model", tiny_llama, "--out", out)
    assert (out / "keep").exists()
    assert fuse("--model", tiny_llama, "--out", out, "--force", "--quiet") == 0
    assert not (out / "keep").exists() and (out / "deus_manifest.json").exists()


def test_force_keeps_the_old_output_when_the_final_rename_fails(tiny_llama, tmp_path, capsys, monkeypatch):
    """--force swaps the old output out before renaming the new one in; if that rename fails, the
    old output is put back, so nothing the user had is lost."""
    import errno

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("the user's old output")
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.partial-") and Path(target) == out:
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        fuse("--model", tiny_llama, "--out", out, "--force", "--quiet")
    assert sorted(p.name for p in out.iterdir()) == ["keep"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary or old copy


def test_an_option_the_method_does_not_use_is_refused(tiny_llama, tmp_path, capsys):
    err = error_of(
        capsys, "--model", tiny_llama, "--out", tmp_path / "o", "--method", "avg", "--ot_solver", "emd"
    )
    assert "--ot_solver: --method avg does not use it (an option of opt-deus)" in err
    err = error_of(
        capsys, "--model", tiny_llama, "--out", tmp_path / "o", "--method", "opt-deus", "--seed", "3"
    )
    assert "--seed: --method opt-deus does not use it (an option of lesa)" in err
    assert not (tmp_path / "o").exists()
    assert (
        fuse("--model", tiny_llama, "--out", tmp_path / "o", "--method", "lesa", "--seed", "3", "--quiet")
        == 0
    )


def test_unknown_yaml_key(tiny_llama, tmp_path, capsys):
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("method: copy\nnum_neww: 3\n")
    err = error_of(capsys, "--model", tiny_llama, "--config", cfg)
    assert "--config: unknown key 'num_neww'" in err and "num_new" in err


def test_missing_yaml(tiny_llama, tmp_path, capsys):
    assert "--config" in error_of(capsys, "--model", tiny_llama, "--config", tmp_path / "x.yaml")


def test_no_disk_space(tiny_llama, tmp_path, capsys, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    err = error_of(capsys, "--model", tiny_llama, "--out", tmp_path / "out")
    assert "--out" in err and "free" in err
    assert leftovers(tmp_path) == []


def test_disk_full_while_writing(tiny_llama, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of writing: one clear error, and the partial output is removed."""
    import errno

    from deus_dist.checkpoint import writer

    real_write = writer.ShardedWriter.write
    calls = {"n": 0}

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, tensor)

    monkeypatch.setattr(writer.ShardedWriter, "write", failing_write)
    err = error_of(capsys, "--model", tiny_llama, "--out", tmp_path / "out")
    assert "no space left" in err and "--out" in err
    assert leftovers(tmp_path) == []


def test_interrupt_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing: no output directory, no temporary directory."""
    from deus_dist.methods import avg

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(avg.Average, "new_block", interrupted)
    assert fuse("--model", tiny_llama, "--out", tmp_path / "out", "--method", "avg", "--quiet") == 130
    assert leftovers(tmp_path) == []


def start_and_catch_writing(tmp_path):
    """Start the tool in a subprocess on a model big enough to catch it while it writes (or
    verifies); returns once a shard exists in its temporary directory."""
    base = make_tiny(tmp_path / "base", hidden_size=256, intermediate_size=1024, num_hidden_layers=8)
    out = tmp_path / "out"
    tool = str(REPO / "tools" / "fuse_layers.py")
    cmd = [
        sys.executable,
        tool,
        "--model",
        str(base),
        "--out",
        str(out),
        "--method",
        "llama-pro",
        "--verify",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/model-*.safetensors")):
        assert proc.poll() is None, "finished before it could be interrupted"
        time.sleep(0.005)
    return proc, base, out


def test_killed_process_leaves_no_finished_output(tmp_path):
    """SIGKILL while writing or verifying: the final directory never appears; a later run cleans up."""
    proc, base, out = start_and_catch_writing(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".out.partial-*"))  # the dead run's hidden temporary directory
    assert fuse("--model", base, "--out", out, "--method", "copy", "--no_verify", "--quiet") == 0
    assert not list(tmp_path.glob(".out.partial-*")) and (out / "deus_manifest.json").exists()


def test_sigterm_cleans_up(tmp_path):
    """SIGTERM (SLURM preemption, say) unwinds like Ctrl-C: nothing left behind."""
    proc, _, out = start_and_catch_writing(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
