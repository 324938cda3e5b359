#!/usr/bin/env python
"""Benchmark the up-scaling tool against mergekit's passthrough on a Llama-3.2-1B-shaped checkpoint.

Builds (once, cached in --workdir) a random bf16 checkpoint of the Llama-3.2-1B shape (16 layers,
d=2048, m=8192, 32 heads, 8 kv heads, vocab 128256, untied: 3.0 GB in 4 shards), then times, in
this one script and interleaved, each run as its own process:
  - mergekit-yaml passthrough, SOLAR-style slices [0,12) + [4,16) (the reference; install it with
    `bash tools/install.sh bench`, it is never imported by deus_dist),
  - our `solar` (the same layout), `llama-pro` and `opt-deus` (16 -> 24),
printing the median wall time and peak RSS of each and the ratios to mergekit. Ours runs with
--no_verify (mergekit verifies nothing; the verification is timed separately once).

    python tools/bench_fuse.py [--workdir /tmp/deus_bench] [--repeats 3] [--methods solar,llama-pro]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_1B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
    dtype="bfloat16",
)


def make_checkpoint(path: Path, layers: int) -> Path:
    """A random bf16 Llama-1B-shaped checkpoint in 4 shards, written with our streaming writer."""
    import torch

    from deus_dist.checkpoint import ShardedWriter, TensorSpec

    cfg = {**LLAMA_1B, "num_hidden_layers": layers}
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()) == cfg:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    d, m, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    block = {
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (m, d),
        "mlp.up_proj.weight": (m, d),
        "mlp.down_proj.weight": (d, m),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
    specs = [TensorSpec("model.embed_tokens.weight", (cfg["vocab_size"], d), torch.bfloat16)]
    for i in range(layers):
        specs += [TensorSpec(f"model.layers.{i}.{s}", shape, torch.bfloat16) for s, shape in block.items()]
    specs += [
        TensorSpec("model.norm.weight", (d,), torch.bfloat16),
        TensorSpec("lm_head.weight", (cfg["vocab_size"], d), torch.bfloat16),
    ]
    total = sum(s.nbytes for s in specs)
    writer = ShardedWriter(path, specs, max_shard_bytes=total // 4 + 1)
    gen = torch.Generator().manual_seed(0)
    print(f"building a random {total / 1e9:.2f} GB checkpoint in {path} ...", flush=True)
    for s in specs:
        t = torch.ones(s.shape) if len(s.shape) == 1 else torch.randn(s.shape, generator=gen) * 0.02
        writer.write(s.name, t.to(torch.bfloat16))
    writer.finish()
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process.

    Linux keeps ru_maxrss across fork+exec, so this parent stays small (it never imports torch
    before the timings; the input is built in a child) or the children would inherit its peak.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/deus_bench", help="where the input and outputs go")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="solar,llama-pro,opt-deus", help="our methods to time")
    ap.add_argument("--skip_mergekit", action="store_true")
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._build:
        make_checkpoint(Path(args._build), 16)
        return
    work = Path(args.workdir)
    base = work / "base"
    subprocess.run([sys.executable, __file__, "--_build", str(base)], check=True)
    runs: dict[str, list[str]] = {}
    mergekit = shutil.which("mergekit-yaml")
    if mergekit and not args.skip_mergekit:
        yml = work / "solar_passthrough.yml"
        yml.write_text(
            "slices:\n"
            f"  - sources:\n      - model: {base}\n        layer_range: [0, 12]\n"
            f"  - sources:\n      - model: {base}\n        layer_range: [4, 16]\n"
            "merge_method: passthrough\ndtype: bfloat16\n"
        )
        runs["mergekit passthrough (solar)"] = [
            mergekit,
            str(yml),
            str(work / "out-mergekit"),
            "--no-copy-tokenizer",
            "--quiet",
            "--no-write-model-card",
            "--clone-tensors",
        ]
    elif not args.skip_mergekit:
        print("mergekit-yaml not found: install the reference with `bash tools/install.sh bench`")
    for method in args.methods.split(","):
        runs[f"deus-dist {method}"] = [
            sys.executable,
            str(REPO / "tools" / "fuse_layers.py"),
            "--model",
            str(base),
            "--out",
            str(work / f"out-{method}"),
            "--method",
            method,
            "--force",
            "--quiet",
            "--no_verify",
        ]

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, cmd in runs.items():
            out = Path(cmd[cmd.index("--out") + 1]) if "--out" in cmd else Path(cmd[2])
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(timed(cmd))
            print(
                f"  run {r + 1}/{args.repeats} {name}: {results[name][-1][0]:.1f} s, "
                f"{results[name][-1][1]:.2f} GB",
                flush=True,
            )

    # The same layout must give the same tensors as the reference.
    if "mergekit passthrough (solar)" in runs and "deus-dist solar" in runs:
        from deus_dist.checkpoint import CheckpointReader

        ours, ref = CheckpointReader(work / "out-solar"), CheckpointReader(work / "out-mergekit")
        assert set(ours.tensors) == set(ref.tensors), "tensor names differ from mergekit's"
        for name in ("model.layers.12.mlp.down_proj.weight", "model.layers.23.self_attn.q_proj.weight"):
            assert ours.read(name).equal(ref.read(name)), name
        print("solar output equals mergekit's passthrough output (names; sampled tensors)")

    opt = work / "out-opt-deus" / "deus_manifest.json"
    if "deus-dist opt-deus" in runs and opt.exists():
        diag = json.loads(opt.read_text())["diagnostics"]
        print("\nopt-deus per-pair solver seconds (last run):")
        print(
            f"{'pair':>6s} " + " ".join(f"{s:>9s}" for s in ("mlp", "kv_heads", "q_heads")) + "  units(mlp)"
        )
        for pair, spaces in diag.items():
            print(
                f"{pair:>6s} "
                + " ".join(f"{spaces[s]['seconds']:9.2f}" for s in ("mlp", "kv_heads", "q_heads"))
                + f"  {spaces['mlp']['units']}"
            )

    verify_cmd = runs[next(k for k in runs if k.startswith("deus-dist"))][:-1]
    verify_wall, verify_rss = timed(verify_cmd)

    print(
        f"\nLlama-3.2-1B shape, 16 -> 24 layers, bf16, {base} ({sum(p.stat().st_size for p in base.glob('*.safetensors')) / 1e9:.2f} GB), "
        f"median of {args.repeats}, {os.cpu_count()} CPUs"
    )
    ref_name = "mergekit passthrough (solar)"
    ref = results.get(ref_name)
    ref_wall = statistics.median(w for w, _ in ref) if ref else None
    ref_rss = statistics.median(m for _, m in ref) if ref else None
    print(f"{'run':34s} {'wall s':>8s} {'peak RSS GB':>12s} {'wall/ref':>9s} {'RSS/ref':>8s}")
    for name, rs in results.items():
        wall = statistics.median(w for w, _ in rs)
        rss = statistics.median(m for _, m in rs)
        ratios = f"{wall / ref_wall:9.2f} {rss / ref_rss:8.2f}" if ref else ""
        print(f"{name:34s} {wall:8.1f} {rss:12.2f} {ratios}")
    print(f"{'deus-dist with default verify':34s} {verify_wall:8.1f} {verify_rss:12.2f}  (one run)")


if __name__ == "__main__":
    main()
