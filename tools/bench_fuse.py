#!/usr/bin/env python
"""Benchmark the up-scaling tool on a Llama-shaped checkpoint: IO against mergekit, OpT-DeUS
against its arithmetic floor.

Builds (once, cached in --workdir) a random bf16 checkpoint of the chosen shape in 4 shards:
  --shape 1b: Llama-3.2-1B (16 layers, d=2048, m=8192, 32 heads, 8 kv heads, untied; 3.0 GB),
  --shape 8b: Llama-3.1-8B (32 layers, d=4096, m=14336, 32 heads, 8 kv heads, untied; 16 GB),
then times, in this one script and interleaved, each run as its own process (wall time, and the
peak memory of the whole process tree, workers included, as PSS, so shared memory counts once):
  - mergekit-yaml passthrough, SOLAR-style slices (the reference for IO; `bash tools/install.sh
    bench` installs it; never imported by deus_dist), with --shape 1b;
  - our `solar`, `llama-pro` and `opt-deus` (L -> 1.5 L). `llama-pro` is a copy method on the same
    input and output layout: the IO floor of `opt-deus`;
  - the cost GEMM of one MLP pair on all cores (a child reads two real layers and builds the cost
    as opt-deus does), times the number of pairs: the arithmetic floor.
It prints opt-deus's wall time against (sum of cost GEMMs + llama-pro's wall time); the target on
CPUs is at most 1.5x. Ours runs with --no_verify (mergekit verifies nothing; the verification is
timed separately once).

    python tools/bench_fuse.py [--shape 1b|8b] [--workdir /tmp/deus_bench] [--repeats 3]
        [--methods solar,llama-pro,opt-deus] [--workers N]
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

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128),
}
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


def make_checkpoint(path: Path, shape: str) -> Path:
    """A random bf16 Llama-shaped checkpoint in 4 shards, written with our streaming writer."""
    import torch

    from deus_dist.checkpoint import ShardedWriter, TensorSpec

    cfg = {**LLAMA_1B, **SHAPES[shape]}
    layers = cfg["num_hidden_layers"]
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


def tree_pss(pid: int) -> int:
    """Proportional set size (bytes) of a process and all its descendants."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = 0
    for p in tree:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak memory (GB) of one child process and its workers, sampled every
    0.25 s as the PSS of the process tree (a worker's shared blocks counted once)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.25)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return wall, peak / 1e9


def pair_gemm_seconds(base: Path) -> float:
    """In this process (a child of the benchmark): the MLP cost of the pair (0, 1) on all cores, as
    opt-deus builds it; the best of two runs."""
    import torch

    from deus_dist.architectures import architecture_for
    from deus_dist.checkpoint import CheckpointReader
    from deus_dist.checkpoint.blocks import read_block
    from deus_dist.ot.align import unit_feature_parts
    from deus_dist.ot.solvers import sq_dist_from_parts

    with CheckpointReader(base) as reader:
        arch = architecture_for(reader.config)
        m = reader.config["intermediate_size"]
        a, b = (read_block(reader, arch, k, torch.device("cpu")) for k in (0, 1))
    pa, pb = unit_feature_parts(a, arch, "mlp", m), unit_feature_parts(b, arch, "mlp", m)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        cost = sq_dist_from_parts(pa, pb)
        best = min(best, time.perf_counter() - start)
        del cost
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--workdir", default="/tmp/deus_bench", help="where the input and outputs go")
    ap.add_argument("--repeats", type=int, default=None, help="default: 3 (1b), 1 (8b)")
    ap.add_argument(
        "--methods", default=None, help="default: solar,llama-pro,opt-deus (1b), llama-pro,opt-deus (8b)"
    )
    ap.add_argument("--workers", default=None, help="opt-deus --workers (default: the tool's)")
    ap.add_argument("--skip_mergekit", action="store_true")
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    ap.add_argument("--_gemm", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._build:
        make_checkpoint(Path(args._build), args.shape)
        return
    if args._gemm:
        print(json.dumps(pair_gemm_seconds(Path(args._gemm))))
        return
    big = args.shape != "1b"
    args.repeats = args.repeats or (1 if big else 3)
    args.methods = args.methods or ("llama-pro,opt-deus" if big else "solar,llama-pro,opt-deus")
    layers = SHAPES[args.shape]["num_hidden_layers"]
    work = Path(args.workdir) / args.shape
    base = work / "base"
    subprocess.run([sys.executable, __file__, "--shape", args.shape, "--_build", str(base)], check=True)
    runs: dict[str, list[str]] = {}
    mergekit = shutil.which("mergekit-yaml")
    if mergekit and not args.skip_mergekit and not big:
        yml = work / "solar_passthrough.yml"
        yml.write_text(
            "slices:\n"
            f"  - sources:\n      - model: {base}\n        layer_range: [0, {layers * 3 // 4}]\n"
            f"  - sources:\n      - model: {base}\n        layer_range: [{layers // 4}, {layers}]\n"
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
    elif not args.skip_mergekit and not big:
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
        ] + (["--workers", args.workers] if args.workers and method == "opt-deus" else [])

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, cmd in runs.items():
            out = Path(cmd[cmd.index("--out") + 1]) if "--out" in cmd else Path(cmd[2])
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(timed(cmd))
            if (out / "deus_manifest.json").exists():
                shutil.copy(out / "deus_manifest.json", work / f"manifest-{out.name}.json")
            if big:  # 24 GB per 8B output: keep the disk for the next run
                shutil.rmtree(out, ignore_errors=True)
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

    opt = work / "manifest-out-opt-deus.json"
    if "deus-dist opt-deus" in runs and opt.exists():
        diag = json.loads(opt.read_text())["diagnostics"]
        print("\nopt-deus per pair (last run; seconds inside a worker, with its share of the threads):")
        print(
            f"{'pair':>6s} {'mlp cost':>9s} {'mlp solve':>9s} {'heads':>7s} {'certified':>9s} {'units':>6s}"
        )
        for pair, spaces in diag.items():
            mlp = spaces["mlp"]
            heads = spaces["kv_heads"]["seconds"] + spaces["q_heads"]["seconds"]
            print(
                f"{pair:>6s} {mlp.get('cost_seconds', 0):9.2f} {mlp['seconds']:9.2f} {heads:7.2f} "
                f"{mlp['certified'] if mlp['certified'] is not None else float('nan'):9.4f} {mlp['units']:6d}"
            )

    verify_wall = verify_rss = None
    if not big:
        verify_cmd = runs[next(k for k in runs if k.startswith("deus-dist"))][:-1]
        verify_wall, verify_rss = timed(verify_cmd)

    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    print(
        f"\n{args.shape} shape, {layers} -> {layers * 3 // 2} layers, bf16, {base} ({size:.2f} GB), "
        f"median of {args.repeats}, {os.cpu_count()} CPUs"
    )
    ref_name = "mergekit passthrough (solar)"
    ref = results.get(ref_name)
    ref_wall = statistics.median(w for w, _ in ref) if ref else None
    ref_rss = statistics.median(m for _, m in ref) if ref else None
    print(f"{'run':34s} {'wall s':>8s} {'peak GB':>8s} {'wall/ref':>9s} {'mem/ref':>8s}")
    walls = {}
    for name, rs in results.items():
        wall = walls[name] = statistics.median(w for w, _ in rs)
        rss = statistics.median(m for _, m in rs)
        ratios = f"{wall / ref_wall:9.2f} {rss / ref_rss:8.2f}" if ref else ""
        print(f"{name:34s} {wall:8.1f} {rss:8.2f} {ratios}")
    if verify_wall is not None:
        print(f"{'deus-dist with default verify':34s} {verify_wall:8.1f} {verify_rss:8.2f}  (one run)")

    if "deus-dist opt-deus" in walls and "deus-dist llama-pro" in walls:
        out = subprocess.run(
            [sys.executable, __file__, "--_gemm", str(base)], check=True, capture_output=True, text=True
        )
        gemm = json.loads(out.stdout.strip().splitlines()[-1])
        pairs = layers // 2
        floor = gemm * pairs + walls["deus-dist llama-pro"]
        print(
            f"\nopt-deus against its floor: cost GEMM {gemm:.1f} s per pair on all cores x {pairs} pairs = "
            f"{gemm * pairs:.1f} s, + llama-pro's IO {walls['deus-dist llama-pro']:.1f} s = {floor:.1f} s; "
            f"opt-deus {walls['deus-dist opt-deus']:.1f} s = {walls['deus-dist opt-deus'] / floor:.2f}x the floor "
            "(target <= 1.5x)"
        )


if __name__ == "__main__":
    main()
