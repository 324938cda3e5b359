#!/usr/bin/env python
"""Training throughput of the engine against plain PyTorch, same shape and trainable set, one process.

Each run builds the up-scaled model shape with random weights, trains ``--warmup`` + ``--steps``
optimizer steps on the same random token batches, and reports the median tokens/s, the step's
forward / backward / optimizer milliseconds (device-synchronised) and peak memory.
On CPUs every run's process keeps the memory it frees, as a CPU training run does
(``train.dist.keep_freed_cpu_memory``), so neither side pays page faults the other does not.

Runs (``--runs``, comma-separated ``KIND:TRAINABLE``):
  plain:top          plain PyTorch: bf16 autocast on GPU, fp32 trainable weights, fused AdamW
  engine:top         our engine under --ds_config (ZeRO-3 as shipped), decoder layers as z3 leaves
  engine-noleaf:top  the same with DeepSpeed's per-sub-module hooks (the straight set-up)
  engine-z2:top      our engine under ds_configs/zero2.json (frozen weights replicated)
  engine-z1:top      our engine under ds_configs/zero1.json
  engine-z0:top      zero1.json at stage 0: DeepSpeed without ZeRO (a reference, not shipped)
  engine-zpp:top     --ds_config with mixed-precision ZeRO++ on the frozen weights (GPUs only)
  TRAINABLE: top / bottom / interleaved (the new layers of that placement) or full (every layer)

examples:
  python tools/bench_train.py                      # GPU: the 1.72B shape; CPU: a small shape
  python tools/bench_train.py --runs plain:top,engine:top,engine:full --steps 10
  DS_ACCELERATOR=cpu python tools/bench_train.py --shape small --runs plain:top,engine:top,engine-noleaf:top
  python tools/bench_train.py --runs plain:top,engine:top,engine-z2:top,engine-z1:top   # every sharding

Every engine run is also printed as a ratio to plain PyTorch with the same trainable set. Each run
is measured in a process of its own (``--no-isolate``: all in this one), ``--rounds`` times in turn.
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
    # A base shape of the memory planner's table (deus_dist/train/memory_plan.BASE_SHAPES), up-scaled
    # by num_new layers, and the batch each step trains on.
    # Llama-3.2-1B up-scaled 16 -> 24 layers: 1.72B parameters, tied embeddings.
    "1b": dict(base="llama-3.2-1b", num_new=8, seq_len=2048, micro_batch=4, rope_theta=500000.0),
    # For CPUs: small enough for seconds per step, big enough that matmuls are not free.
    "small": dict(base="small", num_new=4, seq_len=256, micro_batch=2, rope_theta=10000.0),
}


def base_config(shape: dict) -> dict:
    """The base model's config.json entries of a bench shape."""
    from deus_dist.train.memory_plan import BASE_SHAPES

    return {"model_type": "llama", **BASE_SHAPES[shape["base"]]}


def base_layers(shape: dict) -> int:
    return base_config(shape)["num_hidden_layers"]


TRAINABLE = ("top", "bottom", "interleaved", "full")


def model_config(shape: dict):
    from transformers import LlamaConfig

    keys = {k: v for k, v in base_config(shape).items() if k not in ("model_type", "num_hidden_layers")}
    return LlamaConfig(
        num_hidden_layers=base_layers(shape) + shape["num_new"],
        rope_theta=shape["rope_theta"],
        max_position_embeddings=max(1024, shape["seq_len"]),
        **keys,
    )


def trainable_set(config, shape: dict, which: str) -> set[str]:
    from deus_dist.plan import insertion_plan

    names = [f"model.layers.{i}." for i in range(config.num_hidden_layers)]
    if which == "full":
        return {"all"}
    plan = insertion_plan(
        base_layers(shape), pair=True, placement=which, num_new=shape["num_new"], positions=None
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


def attention(config, cuda: bool) -> str:
    """The attention the engine's loader picks for this shape (train.model.attention_implementation:
    FlashAttention 2 on GPUs where flash-attn is installed), so plain PyTorch runs the same kernels."""
    from deus_dist.train.model import attention_implementation, causal_lm_class

    precision = {"bf16": {"enabled": cuda}, "fp16": {"enabled": False}}
    return attention_implementation(precision, causal_lm_class(config))


def plain_run(config, chosen_prefixes, device, lr):
    from transformers import AutoModelForCausalLM

    cuda = device.type == "cuda"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=torch.bfloat16 if cuda else torch.float32,
            attn_implementation=attention(config, cuda),
        )
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


def engine_run(config, chosen_prefixes, batches, device, lr, ds_path, leaf, zero_extra=None):
    from deus_dist.train.ds_config import load_ds_config, resolve_ds_config
    from deus_dist.train.model import load_model, wrap_model

    raw = load_ds_config(ds_path)
    raw["zero_optimization"].update(zero_extra or {})
    ds = resolve_ds_config(
        raw,
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


SHARDED = {"engine-z2": "zero2.json", "engine-z1": "zero1.json", "engine-z0": "zero1.json"}
"""Engine runs under another shipped config than --ds_config."""
NO_ZERO = {"stage": 0}
"""engine-z0: DeepSpeed without ZeRO (everything replicated, as plain data parallelism), a reference
that is not shipped: it holds every trainable tensor's optimizer state on every GPU, and in bf16
DeepSpeed wraps the optimizer in its FP16_Optimizer for bf16 (``_do_optimizer_sanity_check``:
DDP_BFLOAT16; flat fp32 masters copied from and to the weights every step, as ZeRO-1/2 do). In fp32
it is the plain optimizer with an all-reduce of the gradients."""
ZERO_PP = {"zero_quantized_nontrainable_weights": True, "zero_hpz_partition_size": 1}
"""engine-zpp: --ds_config with mixed-precision ZeRO++ on the frozen weights (they are kept and
gathered quantized; needs DeepSpeed's CUDA quantizer kernels, so GPUs only)."""
KINDS = ("plain", "engine", "engine-noleaf", "engine-zpp", *SHARDED)


def measure(kind, which, args, shape, config, device, batches) -> dict:
    from deus_dist.resources import DS_CONFIGS

    prefixes = trainable_set(config, shape, which)
    held_before = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # what earlier runs in this process still hold (--no-isolate) is not this run's peak
        held_before = torch.cuda.memory_allocated()
    # ZeRO-3's loader replaces F.linear for the rest of the process (deepspeed/runtime/zero/linear.py);
    # each run gets the process as a run of its own would find it
    linear = torch.nn.functional.linear
    if kind == "plain":
        holder, step, trainable = plain_run(config, prefixes, device, args.lr)
    else:
        ds_path = DS_CONFIGS / SHARDED[kind] if kind in SHARDED else args.ds_config
        holder, step, trainable = engine_run(
            config,
            prefixes,
            batches,
            device,
            args.lr,
            ds_path,
            leaf=kind != "engine-noleaf",
            zero_extra={"engine-zpp": ZERO_PP, "engine-z0": NO_ZERO}.get(kind),
        )
    times = []
    for i, ids in enumerate(batches):
        split = step(ids)
        if i >= args.warmup:
            times.append(split)
    tokens = batches[0].numel()
    total = [sum(t) for t in times]
    peak = torch.cuda.max_memory_allocated() - held_before if device.type == "cuda" else None
    result = {
        "run": f"{kind}:{which}",
        "trainable_params": trainable,
        "tokens_per_s": tokens / (statistics.median(total) / 1000),
        "step_ms": statistics.median(total),
        "forward_ms": statistics.median(t[0] for t in times),
        "backward_ms": statistics.median(t[1] for t in times),
        "optimizer_ms": statistics.median(t[2] for t in times),
        "peak_mem_gb": peak / 1e9 if peak is not None else None,
        "peak_mem_bytes": peak,
        "held_before_bytes": held_before if device.type == "cuda" else None,
    }
    if hasattr(holder, "destroy"):
        holder.destroy()
    del holder, step
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # the next model is not loaded into ZeRO-3 partitions
    torch.nn.functional.linear = linear
    gc.collect()
    return result


def measure_isolated(kind: str, which: str, args) -> dict:
    """``measure`` in a new process of this script (one run, one round), its figures read back."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--runs", f"{kind}:{which}", "--rounds", "1"]
        cmd += ["--no-isolate", "--json", out, "--shape", args.shape, "--steps", str(args.steps)]
        cmd += ["--warmup", str(args.warmup), "--lr", str(args.lr), "--ds_config", args.ds_config]
        for option in ("seq_len", "micro_batch"):
            if getattr(args, option) is not None:
                cmd += [f"--{option}", str(getattr(args, option))]
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(
                f"bench_train: the {kind}:{which} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        with open(out) as f:
            return json.load(f)["results"][0]


def combine(measured: list[dict]) -> dict:
    """One run's figures over rounds: medians of the times and rates, the largest peak memory."""
    out = dict(measured[0])
    for key in ("tokens_per_s", "step_ms", "forward_ms", "backward_ms", "optimizer_ms"):
        out[key] = statistics.median(m[key] for m in measured)
    for key in ("peak_mem_gb", "peak_mem_bytes"):
        values = [m[key] for m in measured if m[key] is not None]
        out[key] = max(values) if values else None
    return out


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
    parser.add_argument(
        "--rounds",
        type=int,
        default=1 if cuda else 3,
        help="Measure every run this many times in turn, the order reversed every other round; a run's "
        "figures are the medians over rounds and each ratio is the median of the rounds' own ratios (runs "
        "measured next to each other), so drift and the order of runs cancel. Default: 3 on CPUs, 1 on GPUs.",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Measure each run in a process of its own, as a training run finds it (this script starts "
        "one per run and round). Engines built earlier in a process slow the runs after them (on 2 CPUs, "
        "plain PyTorch by 5-20%%), which --no-isolate (one process, faster to start) leaves in.",
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--ds_config", default=None, help="Default: ds_configs/zero3.json (GPU) / zero3_cpu.json."
    )
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args(argv)
    from deus_dist.train.dist import init_distributed, keep_freed_cpu_memory
    from deus_dist.train.ds_config import default_ds_config

    args.ds_config = args.ds_config or str(default_ds_config(cuda))
    shape = dict(SHAPES[args.shape])
    seq_len, micro = args.seq_len or shape["seq_len"], args.micro_batch or shape["micro_batch"]
    config = model_config(shape)
    from deus_dist.train.run import quiet_known_warnings

    quiet_known_warnings()  # DeepSpeed's deprecated collectives, once per call otherwise
    device = batches = None
    if not args.isolate:  # each run's own process does this
        device = init_distributed().device
        if not cuda:  # as a CPU training run does (train.run.start), for plain PyTorch too
            keep_freed_cpu_memory()
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
        f"device {name}; shape {args.shape}: {base_layers(shape)} -> {config.num_hidden_layers} layers, "
        f"d={config.hidden_size}, micro-batch {micro} x {seq_len} tokens, {attention(config, cuda)} attention; "
        f"ds_config {args.ds_config}"
    )
    print(
        f"{'run':22} {'trainable':>11} {'tokens/s':>10} {'step ms':>9} {'fwd':>8} {'bwd':>8} {'opt':>8} {'peak GB':>8}"
    )
    specs = [tuple(spec.split(":")) for spec in args.runs.split(",")]
    bad = [":".join(s) for s in specs if len(s) != 2 or s[0] not in KINDS or s[1] not in TRAINABLE]
    if bad:
        parser.error(
            f"--runs: {', '.join(bad)}: each run is KIND:TRAINABLE, KIND one of {', '.join(KINDS)}, "
            f"TRAINABLE one of {', '.join(TRAINABLE)}"
        )
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    rounds = []  # per round: run name -> its figures
    for r in range(args.rounds):
        order = specs if r % 2 == 0 else specs[::-1]
        if args.isolate:
            rounds.append({f"{k}:{w}": measure_isolated(k, w, args) for k, w in order})
        else:
            rounds.append({f"{k}:{w}": measure(k, w, args, shape, config, device, batches) for k, w in order})
        if args.rounds > 1:
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {x['tokens_per_s']:.0f} tok/s" for n, x in rounds[-1].items()),
                file=sys.stderr,
                flush=True,
            )
    results = [combine([rd[f"{k}:{w}"] for rd in rounds]) for k, w in specs]
    for r in results:
        mem = f"{r['peak_mem_gb']:8.1f}" if r["peak_mem_gb"] is not None else f"{'-':>8}"
        print(
            f"{r['run']:22} {r['trainable_params'] / 1e6:10.1f}M {r['tokens_per_s']:10.0f} {r['step_ms']:9.1f} "
            f"{r['forward_ms']:8.1f} {r['backward_ms']:8.1f} {r['optimizer_ms']:8.1f} {mem}",
            flush=True,
        )
    pairs = {}
    for kind, which in specs:  # every engine run against plain PyTorch with the same trainable set
        if kind != "plain" and ("plain", which) in specs:
            pairs[f"{kind}:{which} / plain:{which}"] = (f"{kind}:{which}", f"plain:{which}")
    if ("engine", "top") in specs and ("engine", "full") in specs:
        pairs["engine:top / engine:full"] = ("engine:top", "engine:full")
    ratios, per_round = {}, {}
    for label, (a, b) in pairs.items():
        per_round[label] = [rd[a]["tokens_per_s"] / rd[b]["tokens_per_s"] for rd in rounds]
        ratios[label] = statistics.median(per_round[label])
        spread = f"  (rounds: {', '.join(f'{x:.2f}' for x in per_round[label])})" if args.rounds > 1 else ""
        print(f"{label:40} {ratios[label]:.2f}x{spread}")
    if args.json:
        with open(args.json, "w") as f:
            report = {
                "device": name,
                "cuda": cuda,
                "shape": args.shape,
                "results": results,
                "ratios": ratios,
                "ratios_per_round": per_round,
                "rounds": rounds,
            }
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
