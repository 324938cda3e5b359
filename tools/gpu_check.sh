#!/usr/bin/env bash
# The prepared GPU check: one script, under 8 minutes on one H200, that writes OUT/gpu_check.json
# (every step: status, seconds, figures) and OUT/gpu_check.txt (the same as a table).
#
#   bash tools/gpu_check.sh OUT                 # on the GPU machine
#   bash tools/gpu_check.sh OUT --cpu-dry-run   # here: the same steps at CPU sizes (tests run it)
#
# Steps: tests/test_gpu.py; bf16 CPT on 1 GPU, SIGTERM mid-run, resume, losses equal to an
# uninterrupted run; SFT with packing; tools/bench_train.py on the 1.72B shape for every sharding;
# tools/plan_memory.py against each engine's measured peak (target: within 15% of
# torch.cuda.max_memory_allocated); tools/fuse_layers.py --device cuda on the Llama-3.2-1B shape.
#
# What a bare H200 machine lacks travels as wheels in tools/gpu_wheels/ (git-ignored; 37 MB), made
# here once with Python 3.12 targets (the GPU machine's python3):
#   P="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P \
#     -d tools/gpu_wheels pot==0.9.7.post1 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 \
#     typing-inspection==0.4.2 hjson==3.1.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   python3 -m pip wheel --no-deps --no-build-isolation -w tools/gpu_wheels deepspeed==0.19.8  # pure Python
# and carried with the call (device tool: carry ["tools/gpu_wheels"]).
set -u -o pipefail

OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [--cpu-dry-run]}
DRY=0
[ "${2:-}" = "--cpu-dry-run" ] && DRY=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.jsonl"
: >"$STEPS"
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}

if [ "$DRY" = 1 ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    DS=ds_configs/zero3_cpu.json PREC=fp32 BENCH_SHAPE=small BENCH_STEPS="--steps 1 --warmup 1" ZPP=""
    FUSE_DEVICE=cpu FUSE_SHAPE=tiny GPU_MEM=24
else
    export TORCH_CUDA_ARCH_LIST=9.0 # DeepSpeed's JIT parser fails on 9.0a
    DS=ds_configs/zero3.json PREC=bf16 BENCH_SHAPE=1b BENCH_STEPS="--steps 4 --warmup 2" ZPP=",engine-zpp:top"
    FUSE_DEVICE=cuda FUSE_SHAPE=llama-3.2-1b GPU_MEM=139
    if ls tools/gpu_wheels/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" tools/gpu_wheels/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:$WORK/site"
    fi
fi

export WORK PY DS PREC GPU_MEM BENCH_SHAPE FUSE_DEVICE FUSE_SHAPE DRY

# step NAME TIMEOUT_S CMD...: run one step, keep its log, record status and seconds
step() {
    local name=$1 limit=$2
    shift 2
    local log="$WORK/$name.log" start rc
    start=$(date +%s.%N)
    # a child bash, so that steps may be this script's (exported) functions
    timeout --signal=TERM --kill-after=15 "$limit" bash -c '"$@"' bash "$@" >"$log" 2>&1
    rc=$?
    $PY - "$name" "$rc" "$start" "$log" >>"$STEPS" <<'EOF'
import json, sys, time
name, rc, start, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
text = open(log, errors="replace").read()
print(json.dumps({"step": name, "rc": rc, "seconds": round(time.time() - start, 1),
                  "log_tail": text[-1500:] if rc else text[-300:]}))
EOF
    echo "[gpu_check] $name: rc=$rc"
    return $rc
}

# -- 1. the GPU tests (skipped, and quick, without a GPU)
step test_gpu 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py

# -- 2. a small up-scaled model with a character tokenizer, real text (this repository's README)
prepare() {
    $PY - "$WORK" <<'EOF'
import json, re, sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import add_char_tokenizer, make_tiny
work = Path(sys.argv[1])
base = make_tiny(work / "base", "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512)
add_char_tokenizer(base)
text = Path("README.md").read_text()
paras = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 80]
with open(work / "text.jsonl", "w") as f:
    for p in paras:
        f.write(json.dumps({"text": p}) + "\n")
# conversations: a README section's heading asks, its first paragraph answers; each is at most
# 120 + 260 characters, so that it fits a 512-token row of the character tokenizer whole, whatever
# the README holds (a conversation that does not fit is dropped, and with it perhaps the held-out set)
sections = re.findall(r"^#+ (.+)\n+((?:.+\n)+)", text, flags=re.M)
with open(work / "chat.jsonl", "w") as f:
    for i, (head, body) in enumerate(sections * 4):
        msgs = [{"role": "user", "content": f"Explain: {head.strip()}"[:120]},
                {"role": "assistant", "content": body.strip()[: 60 + (i * 37) % 200]}]
        f.write(json.dumps({"messages": msgs}) + "\n")
print(len(paras), "paragraphs,", len(sections), "sections")
EOF
    [ $? = 0 ] && $PY tools/fuse_layers.py --model "$WORK/base" --out "$WORK/up" --quiet
}
export -f prepare
step prepare 180 prepare

# -- 3. CPT: uninterrupted, then SIGTERM mid-run and a resume; every step's loss must match
cpt() { # exec: a signal sent to the background job reaches the training process itself
    exec $PY launchers/cpt.py --model "$WORK/up" --data "$WORK/text.jsonl" --ds_config "$DS" --precision "$PREC" \
        --seq_len 128 --micro_batch 2 --grad_accum 2 --max_steps 30 --lr 1e-3 --warmup_steps 0 \
        --eval_batches 2 --quiet --no_export --data_cache "$WORK/cache" "$@"
}
export -f cpt
step cpt_uninterrupted 180 cpt --output_dir "$WORK/cpt_full"
sigterm_run() {
    cpt --output_dir "$WORK/cpt_term" &
    local pid=$! n=0
    # wait for step 5 in metrics.jsonl, then ask the run to stop as a scheduler would
    while kill -0 $pid 2>/dev/null; do
        if [ -f "$WORK/cpt_term/metrics.jsonl" ] && [ "$(wc -l <"$WORK/cpt_term/metrics.jsonl")" -ge 5 ]; then
            kill -TERM $pid
            break
        fi
        sleep 0.1
        n=$((n + 1))
    done
    wait $pid
    local rc=$?
    echo "stopped after $(wc -l <"$WORK/cpt_term/metrics.jsonl") steps, status $rc"
    ls "$WORK/cpt_term/checkpoints" || return 1 # the signal made it save
    # status 3: stopped by a signal, checkpoint saved (what SLURM batch scripts requeue on)
    [ $rc = 3 ] && [ "$(wc -l <"$WORK/cpt_term/metrics.jsonl")" -lt 30 ]
}
export -f sigterm_run
step cpt_sigterm 180 sigterm_run
step cpt_resume 180 cpt --output_dir "$WORK/cpt_term"
compare_runs() {
    grep -q "resumed from" "$WORK/cpt_resume.log" || { echo "the second run did not resume"; return 1; }
    $PY - "$WORK/cpt_full/metrics.jsonl" "$WORK/cpt_term/metrics.jsonl" "$WORK/compare.json" <<'EOF'
import json, sys
a, b = ([json.loads(l) for l in open(p) if l.strip()] for p in sys.argv[1:3])
a, b = {r["step"]: r["loss"] for r in a}, {r["step"]: r["loss"] for r in b}
worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
json.dump({"steps": len(a), "resumed_steps": len(b), "max_rel_loss_diff": worst}, open(sys.argv[3], "w"))
print(f"{len(a)} steps; largest relative loss difference {worst:.2e}")
sys.exit(0 if sorted(a) == sorted(b) and worst <= 2e-3 else 1)
EOF
}
export -f compare_runs
step cpt_resume_equals_uninterrupted 30 compare_runs

# -- 4. SFT with packing (FlashAttention varlen where installed, else SDPA with a block mask)
step sft_packing 180 $PY launchers/sft.py --model "$WORK/up" --data "$WORK/chat.jsonl" --ds_config "$DS" \
    --precision "$PREC" --seq_len 512 --micro_batch 2 --grad_accum 1 --max_steps 6 --lr 1e-3 \
    --warmup_steps 0 --eval_batches 1 --quiet --packing --chat_template chatml \
    --output_dir "$WORK/sft" --no_export

# -- 5. training throughput of every sharding against plain PyTorch: one process and one round, to
# stay within the check's minutes (a fuller measurement: bench_train.py's defaults, a process per run)
step bench_train 300 $PY tools/bench_train.py --shape "$BENCH_SHAPE" $BENCH_STEPS --no-isolate --rounds 1 \
    --runs "plain:top,plain:full,engine:top,engine-z2:top,engine-z1:top,engine-z0:top,engine:full,engine:bottom$ZPP" \
    --json "$WORK/bench.json"

# -- 6. the memory plan against each engine's measured peak (same shape, 1 GPU)
plan_vs_peak() {
    $PY - "$WORK/bench.json" "$BENCH_SHAPE" "$GPU_MEM" "$WORK/plan.json" <<'EOF'
import json, sys
sys.path.insert(0, "tools")
from bench_train import SHAPES
from deus_dist.cli.plan_memory import PlanMemoryConfig, build
bench, shape_name, gpu_mem, out = json.load(open(sys.argv[1])), sys.argv[2], float(sys.argv[3]), sys.argv[4]
shape = SHAPES[shape_name]
runs = {r["run"]: r for r in bench["results"]}
rows = []
for placement in ("top", "interleaved", "bottom"):
    cfg = PlanMemoryConfig(base=shape["base"], placement=placement, num_new=shape["num_new"], gpus_per_node=1,
                           seq_len=shape["seq_len"], micro_batch=shape["micro_batch"],
                           precision="bf16" if bench.get("cuda") else "fp32", gpu_memory=gpu_mem,
                           compare_placements=False)
    plan, _ = build(cfg)
    for c in plan.choices:
        kind = {"zero3": "engine", "zero2": "engine-z2", "zero1": "engine-z1"}.get(c.name)
        r = runs.get(f"{kind}:{placement}")
        if r is None:
            continue
        measured = r.get("peak_mem_bytes")
        rows.append({"run": r["run"], "planned_gib": c.peak / 2**30,
                     "measured_gib": measured / 2**30 if measured else None,
                     "ratio": c.peak / measured if measured else None})
json.dump(rows, open(out, "w"), indent=1)
for row in rows:
    print(row)
bad = [r for r in rows if r["ratio"] is not None and not 0.85 <= r["ratio"] <= 1.15]
sys.exit(1 if bad or not rows else 0)
EOF
}
export -f plan_vs_peak
step plan_vs_peak 60 plan_vs_peak

# -- 6b. mixed-precision ZeRO++ on the frozen weights: what quantizing them does to the logits
# (its speed is bench_train's engine-zpp:top). DeepSpeed's quantizer is CUDA-only, so the CPU dry run
# runs the same comparison with ZeRO++ left off on both sides (a small model; no logit may change):
# the code the GPU run depends on is exercised here, not first met on the GPU.
zeropp_logits() {
    $PY - "$WORK" "$DS" "$DRY" <<'EOF'
import json, os, sys
import torch
work, ds_path, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sys.path.insert(0, "tools")
from bench_train import ZERO_PP
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from deus_dist.train.dist import init_distributed
from deus_dist.train.ds_config import load_ds_config, resolve_ds_config
from deus_dist.train.model import load_model, wrap_model
env = init_distributed()
quantize = not dry and env.device.type == "cuda"
if quantize:
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    seq = 512
else:
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    seq = 64
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(os.path.join(work, "zpp_model"))
ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1)).to(env.device)
top = tuple(f"model.layers.{i}." for i in range(cfg.num_hidden_layers - 2, cfg.num_hidden_layers))
logits = {}
for name, extra in (("zero3", {}), ("zeropp", ZERO_PP if quantize else {})):
    raw = load_ds_config(ds_path)
    raw["zero_optimization"].update(extra)
    ds = resolve_ds_config(raw, micro_batch=2, grad_accum=1, world_size=1, lr=1e-4, betas=[0.9, 0.95],
                           weight_decay=0.0, grad_clip=1.0, hidden_size=cfg.hidden_size,
                           cuda=env.device.type == "cuda")
    model, hf_ds = load_model(os.path.join(work, "zpp_model"), ds, activation_checkpointing=False)
    chosen = {n for n, _ in model.named_parameters() if n.startswith(top)}
    engine, _ = wrap_model(model, chosen, ds, 0.0)
    engine.eval()
    with torch.no_grad():
        logits[name] = engine(input_ids=ids, use_cache=False).logits.float()
    engine.destroy()
    del engine, model, hf_ds
    unset_hf_deepspeed_config()
a, b = logits["zero3"], logits["zeropp"]
kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
out = {"max_abs_logit_change": (a - b).abs().max().item(), "mean_abs_logit_change": (a - b).abs().mean().item(),
       "logit_std": a.std().item(), "kl_per_token": kl.item() / a.shape[1],
       "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(), "quantized": quantize}
if not quantize:
    out["note"] = "ZeRO++ off on both sides: DeepSpeed's quantizer has CUDA kernels only (QuantizerBuilder)"
json.dump(out, open(os.path.join(work, "zeropp.json"), "w"))
print(out)
sys.exit(0 if quantize or out["max_abs_logit_change"] == 0 else 1)
EOF
}
export -f zeropp_logits
step zeropp_logits 180 zeropp_logits

# -- 7. OpT-DeUS on the GPU: the Llama-3.2-1B shape, 16 -> 24 layers, random bf16 weights
fuse_1b() {
    $PY - "$WORK/base1b" "$FUSE_SHAPE" <<'EOF'
import sys, json, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from deus_dist.train.memory_plan import BASE_SHAPES
shape = BASE_SHAPES.get(sys.argv[2]) or dict(num_hidden_layers=6, hidden_size=64, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=True)
device = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(device):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1], max_shard_size="1GB")
EOF
    [ $? = 0 ] || return 1
    local start end
    start=$(date +%s.%N)
    $PY tools/fuse_layers.py --model "$WORK/base1b" --out "$WORK/up1b" --device "$FUSE_DEVICE" --quiet || return 1
    end=$(date +%s.%N)
    echo "fuse seconds: $(echo "$end - $start" | bc 2>/dev/null || $PY -c "print($end - $start)")"
    rm -rf "$WORK/base1b" "$WORK/up1b"
}
export -f fuse_1b
step fuse_cuda 300 fuse_1b

# -- the report: one JSON, one table
$PY - "$STEPS" "$WORK" "$OUT" "$DRY" <<'EOF'
import json, os, platform, sys
steps_file, work, out, dry = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
steps = [json.loads(l) for l in open(steps_file) if l.strip()]
def load(name):
    p = os.path.join(work, name)
    return json.load(open(p)) if os.path.exists(p) else None
import importlib.util
import torch
from deus_dist.train.model import PACKED_SEQUENCE_KERNELS
# which kernels the packed-conversation paths ran on (flash-attn: FlashAttention 2 varlen, else SDPA;
# PACKED_SEQUENCE_KERNELS: a hybrid's packed Mamba layers)
kernels = {k: importlib.util.find_spec(k) is not None for k in ("flash_attn", *PACKED_SEQUENCE_KERNELS)}
report = {
    "mode": "cpu-dry-run" if dry else "gpu",
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
    "torch": torch.__version__, "python": platform.python_version(), "kernels": kernels,
    "passed": all(s["rc"] == 0 for s in steps),
    "steps": steps, "bench": load("bench.json"), "plan_vs_peak": load("plan.json"),
    "cpt_resume": load("compare.json"), "zeropp": load("zeropp.json"),
}
json.dump(report, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
have = ", ".join(k for k, v in kernels.items() if v) or "none"
lines = [f"gpu_check ({report['mode']}) on {report['device']}, torch {report['torch']}; optional kernels: {have}", "",
         f"{'step':34}{'status':>8}{'seconds':>9}"]
lines += [f"{s['step']:34}{'ok' if s['rc'] == 0 else 'FAIL ' + str(s['rc']):>8}{s['seconds']:9.1f}" for s in steps]
if report["bench"]:
    lines += ["", f"{'bench run':24}{'tokens/s':>10}{'vs plain:top':>14}{'peak GiB':>10}"]
    by = {r["run"]: r for r in report["bench"]["results"]}
    ref = by.get("plain:top", {}).get("tokens_per_s")
    for r in report["bench"]["results"]:
        peak = r.get("peak_mem_bytes")
        lines.append(f"{r['run']:24}{r['tokens_per_s']:10.0f}{(r['tokens_per_s'] / ref if ref else 0):14.2f}"
                     + (f"{peak / 2**30:10.2f}" if peak else f"{'-':>10}"))
if report["zeropp"]:
    lines += ["", "mixed-precision ZeRO++ on the frozen weights: "
              + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in report["zeropp"].items())]
if report["plan_vs_peak"]:
    lines += ["", f"{'plan vs peak':24}{'planned':>10}{'measured':>10}{'ratio':>8}"]
    for r in report["plan_vs_peak"]:
        m = f"{r['measured_gib']:10.2f}" if r["measured_gib"] else f"{'-':>10}"
        q = f"{r['ratio']:8.2f}" if r["ratio"] else f"{'-':>8}"
        lines.append(f"{r['run']:24}{r['planned_gib']:10.2f}{m}{q}")
open(os.path.join(out, "gpu_check.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if report["passed"] else 1)
EOF
