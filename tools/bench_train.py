#!/usr/bin/env python
"""Training throughput of the engine against plain PyTorch, same shape and trainable set, one process.

Each run builds the up-scaled model shape with random weights, trains ``--warmup`` + ``--steps``
optimizer steps on the same random token batches, and reports the median tokens/s, the step's
forward / backward / optimizer milliseconds (device-synchronised) and peak memory.

Runs (``--runs``, comma-separated ``KIND:TRAINABLE``):
  plain:top          plain PyTorch: bf16 autocast on GPU, fp32 trainable weights, fused AdamW
  engine:top         our engine under --ds_config (ZeRO-3 as shipped), decoder layers as z3 leaves
  engine-noleaf:top  the same with DeepSpeed's per-sub-module hooks (the straight set-up)
  engine-z2:top      our engine under ds_configs/zero2.json (frozen weights replicated)
  engine-z1:top      our engine under ds_configs/zero1.json
  TRAINABLE: top / bottom / interleaved (the new layers of that placement) or full (every layer)

examples:
  python tools/bench_train.py                      # GPU: the 1.72B shape; CPU: a small shape
  python tools/bench_train.py --runs plain:top,engine:top,engine:full --steps 10
  DS_ACCELERATOR=cpu python tools/bench_train.py --shape small --runs plain:top,engine:top,engine-noleaf:top
  python tools/bench_train.py --runs plain:top,engine:top,engine-z2:top,engine-z1:top   # every sharding

Every engine run is also printed as a ratio to plain PyTorch with the same trainable set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

SHAPES = {
    # Llama-3.2-1B up-scaled 16 -> 24 layers: 1.72B parameters, tied embeddings.
    "1b": dict(
        base_layers=16,
        num_new=8,
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        seq_len=2048,
        micro_batch=4,
    ),
    # For CPUs: small enough for seconds per step, big enough that matmuls are not free.
    "small": dict(
        base_layers=8,
        num_new=4,
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        seq_len=256,
        micro_batch=2,
    ),
}


TRAINABLE = ("top", "bottom", "interleaved", "full")


def model_config(shape: dict):
    from transformers import LlamaConfig

    keys = {k: v for k, v in shape.items() if k not in ("base_layers", "num_new", "seq_len", "micro_batch")}
    return LlamaConfig(num_hidden_layers=shape["base_layers"] + shape["num_new"], **keys)


def trainable_set(config, shape: dict, which: str) -> set[str]:
    from deus_dist.plan import insertion_plan

    names = [f"model.layers.{i}." for i in range(config.num_hidden_layers)]
    if which == "full":
        return {"all"}
    plan = insertion_plan(
        shape["base_layers"], pair=True, placement=which, num_new=shape["num_new"], positions=None
    )
    return {names[i] for i in plan.new_layers}


def chosen_names(model, prefixes: set[str]) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    if prefixes == {"all"}:
        return {n for n in names if n.startswith("model.layers.")}  # every layer; embeddings frozen
    return {n for n in names if any(n.startswith(p) for p in prefixes)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device):
        self.device, self.marks = device, []

    def mark(self):
        sync(self.device)
        self.marks.append(time.perf_counter())

    def split(self) -> list[float]:
        m, self.marks = self.marks, []
        return [1000 * (b - a) for a, b in zip(m, m[1:], strict=False)]


def plain_run(config, chosen_prefixes, device, lr):
    from transformers import AutoModelForCausalLM

    cuda = device.type == "cuda"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = False
    chosen = chosen_names(model, chosen_prefixes)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        if name in chosen:
            p.data = p.data.float()  # fp32 master weights; compute in bf16 under autocast
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), fused=True)
    timer = Timer(device)

    def step(ids):
        timer.mark()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        timer.mark()
        loss.backward()
        timer.mark()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.mark()
        return timer.split()

    return model, step, sum(p.numel() for p in params)


def engine_run(config, chosen_prefixes, batches, device, lr, ds_path, leaf):
    from deus_dist.train.ds_config import load_ds_config, resolve_ds_config
    from deus_dist.train.model import load_model, wrap_model

    ds = resolve_ds_config(
        load_ds_config(ds_path),
        micro_batch=batches[0].shape[0],
        grad_accum=1,
        world_size=1,
        lr=lr,
        betas=[0.9, 0.95],
        weight_decay=0.0,
        grad_clip=1.0,
        hidden_size=config.hidden_size,
        cuda=device.type == "cuda",
    )
    model, hf_ds = load_model(config, ds, activation_checkpointing=False)
    engine, counts = wrap_model(model, chosen_names(model, chosen_prefixes), ds, 0.0, leaf_layers=leaf)
    engine.hf_ds_config = hf_ds
    timer = Timer(device)

    def step(ids):
        timer.mark()
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        timer.mark()
        engine.backward(loss)
        timer.mark()
        engine.step()
        timer.mark()
        return timer.split()

    return engine, step, counts["trainable"]


SHARDED = {"engine-z2": "zero2.json", "engine-z1": "zero1.json"}
"""Engine runs under another shipped config than --ds_config."""
KINDS = ("plain", "engine", "engine-noleaf", *SHARDED)


def measure(kind, which, args, shape, config, device, batches) -> dict:
    from deus_dist.resources import DS_CONFIGS

    prefixes = trainable_set(config, shape, which)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # ZeRO-3's loader replaces F.linear for the rest of the process (deepspeed/runtime/zero/linear.py);
    # each run gets the process as a run of its own would find it
    linear = torch.nn.functional.linear
    if kind == "plain":
        holder, step, trainable = plain_run(config, prefixes, device, args.lr)
    else:
        ds_path = DS_CONFIGS / SHARDED[kind] if kind in SHARDED else args.ds_config
        holder, step, trainable = engine_run(
            config, prefixes, batches, device, args.lr, ds_path, leaf=kind != "engine-noleaf"
        )
    times = []
    for i, ids in enumerate(batches):
        split = step(ids)
        if i >= args.warmup:
            times.append(split)
    tokens = batches[0].numel()
    total = [sum(t) for t in times]
    result = {
        "run": f"{kind}:{which}",
        "trainable_params": trainable,
        "tokens_per_s": tokens / (statistics.median(total) / 1000),
        "step_ms": statistics.median(total),
        "forward_ms": statistics.median(t[0] for t in times),
        "backward_ms": statistics.median(t[1] for t in times),
        "optimizer_ms": statistics.median(t[2] for t in times),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }
    if hasattr(holder, "destroy"):
        holder.destroy()
    del holder, step
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # the next model is not loaded into ZeRO-3 partitions
    torch.nn.functional.linear = linear
    gc.collect()
    return result


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b" if cuda else "small")
    parser.add_argument("--runs", default="plain:top,engine:top,engine-noleaf:top,engine:full")
    parser.add_argument("--steps", type=int, default=10, help="Measured steps per run (median reported).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq_len", type=int, help="Default: the shape's (2048 for 1b).")
    parser.add_argument("--micro_batch", type=int, help="Default: the shape's (4 for 1b).")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--ds_config", default=None, help="Default: ds_configs/zero3.json (GPU) / zero3_cpu.json."
    )
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args(argv)
    from deus_dist.train.dist import init_distributed
    from deus_dist.train.ds_config import default_ds_config

    args.ds_config = args.ds_config or str(default_ds_config(cuda))
    shape = dict(SHAPES[args.shape])
    seq_len, micro = args.seq_len or shape["seq_len"], args.micro_batch or shape["micro_batch"]
    config = model_config(shape)
    env = init_distributed()
    device = env.device
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, config.vocab_size, (micro, seq_len), generator=g).to(device)
        for _ in range(args.warmup + args.steps)
    ]
    name = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    print(
        f"device {name}; shape {args.shape}: {shape['base_layers']} -> {config.num_hidden_layers} layers, "
        f"d={config.hidden_size}, micro-batch {micro} x {seq_len} tokens; ds_config {args.ds_config}"
    )
    print(
        f"{'run':22} {'trainable':>11} {'tokens/s':>10} {'step ms':>9} {'fwd':>8} {'bwd':>8} {'opt':>8} {'peak GB':>8}"
    )
    specs = [spec.split(":") for spec in args.runs.split(",")]
    bad = [":".join(s) for s in specs if len(s) != 2 or s[0] not in KINDS or s[1] not in TRAINABLE]
    if bad:
        parser.error(
            f"--runs: {', '.join(bad)}: each run is KIND:TRAINABLE, KIND one of {', '.join(KINDS)}, "
            f"TRAINABLE one of {', '.join(TRAINABLE)}"
        )
    results = []
    for kind, which in specs:
        r = measure(kind, which, args, shape, config, device, batches)
        results.append(r)
        mem = f"{r['peak_mem_gb']:8.1f}" if r["peak_mem_gb"] is not None else f"{'-':>8}"
        print(
            f"{r['run']:22} {r['trainable_params'] / 1e6:10.1f}M {r['tokens_per_s']:10.0f} {r['step_ms']:9.1f} "
            f"{r['forward_ms']:8.1f} {r['backward_ms']:8.1f} {r['optimizer_ms']:8.1f} {mem}",
            flush=True,
        )
    by = {r["run"]: r["tokens_per_s"] for r in results}
    ratios = {}
    for kind, which in specs:  # every engine run against plain PyTorch with the same trainable set
        if kind != "plain" and f"plain:{which}" in by:
            ratios[f"{kind}:{which} / plain:{which}"] = by[f"{kind}:{which}"] / by[f"plain:{which}"]
    if "engine:top" in by and "engine:full" in by:
        ratios["engine:top / engine:full"] = by["engine:top"] / by["engine:full"]
    for label, ratio in ratios.items():
        print(f"{label:40} {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            report = {"device": name, "cuda": cuda, "shape": args.shape, "results": results, "ratios": ratios}
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
