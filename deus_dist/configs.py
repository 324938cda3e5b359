"""Typed configs of the entry points; each field's docstring is its ``--help`` text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


def _at_least(cfg, low: int, *names: str) -> list[str]:
    """``--name must be at least low`` for each given (not None) option below ``low``."""
    values = [(n, getattr(cfg, n)) for n in names]
    return [f"--{n} must be at least {low}, got {v}" for n, v in values if v is not None and v < low]


def _positive(cfg, *names: str) -> list[str]:
    """``--name must be positive`` for each given (not None) option below 1."""
    values = [(n, getattr(cfg, n)) for n in names]
    return [f"--{n} must be positive, got {v}" for n, v in values if v is not None and v < 1]


def _open_unit(cfg, *names: str) -> list[str]:
    """``--name must be in (0, 1)`` for each given option outside the open unit interval."""
    return [f"--{n} must be in (0, 1), got {getattr(cfg, n)}" for n in names if not 0 < getattr(cfg, n) < 1]


class Checked:
    """A config whose option values are checked by ``problems()``: every section (base class) of the
    config adds the range checks of its own fields in ``_range_problems``; inputs (files, models,
    checkpoints) are checked by the entry point, against the values."""

    def problems(self) -> list[str]:
        out: list[str] = []
        for klass in reversed(type(self).__mro__):
            own = klass.__dict__.get("_range_problems")
            if own is not None:
                out += own(self)
        return out


@dataclass
class FuseConfig:
    """Options of ``tools/fuse_layers.py``."""

    model: str | None = None
    """Base checkpoint: an HF directory (config.json + safetensors), or a hub name on machines
    that reach the hub. Default: the embedded SmolLM2-135M."""
    out: str | None = None
    """Output directory. Default: ./upscaled/<model>-<method>-<layers>L."""
    method: str = "opt-deus"
    """How a new block is made: opt-deus, avg, copy, llama-pro, solar, lesa (see the README)."""
    num_new: int | None = None
    """How many new blocks. Default: L/2 (for solar: L - 2*floor(L/4))."""
    placement: Literal["top", "bottom", "middle", "top-bottom", "interleaved"] | None = None
    """Which gaps get the new blocks. Default: the method's (top for opt-deus/avg/copy/lesa,
    interleaved for llama-pro). Not used by solar. opt-deus keeps the paper's top half: the
    default study (README, tools/study.py; 135M, 3 seeds) found interleaved blocks better only
    in-domain (0.017 nats) and no different on the three other domains; top trains fastest and
    needs the least activation memory. interleaved follows the in-domain result (and there
    OpT-DeUS beat LLaMA Pro out of domain; at the top the two tied or LLaMA Pro was slightly
    ahead)."""
    positions: list[int] | None = None
    """Explicit gaps K1,K2,...: one new block between base layers K and K+1 for each K
    (for copy methods K may be the last layer: a block after it). Overrides --placement."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of the written weights; auto keeps each tensor's input dtype."""
    out_shard_size: str = "5GB"
    """Largest output shard, e.g. 5GB, 500MB, 2GiB."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where new blocks are computed."""
    workers: int | None = None
    """How many new blocks are made at once, each by its own process (its share of the CPU
    threads, or its own GPU). Default: for opt-deus with weight costs, as many as there are
    cores (or visible GPUs) and as memory allows; 1 otherwise. Under torchrun each rank is one
    worker."""
    force: bool = False
    """Replace an existing --out."""
    verify: bool | None = None
    """Check the written model: keys and shapes always; for function-preserving methods also that
    its logits equal the base's. Default: the logits check runs when both models fit comfortably
    in memory. --verify forces it, --no_verify skips all checks."""
    quiet: bool = False
    """No progress bar or summary."""
    ot_variant: Literal["aligned", "reference"] = "aligned"
    """opt-deus: 'aligned' transports whole KV groups, query heads and MLP neurons (one plan per
    space); 'reference' reproduces the authors' released code (per-matrix Sinkhorn, reg 0.06)."""
    ot_solver: Literal["auction", "exact", "sinkhorn", "emd"] = "auction"
    """opt-deus: the transport solver. auction (default): an epsilon-scaling auction in torch (CPU
    threads or the GPU) whose plan is certified, by its duality gap, to keep at least 1 - --ot_tol
    of the optimum's improvement over the identity order; at the Llama-3.1-8B MLP shape it takes
    0.4x the time of building the cost and a twentieth of exact's (README, measured). exact: SciPy's dense
    assignment, the optimum, single-threaded and O(n^3) (113 s per 8B MLP pair here). sinkhorn:
    log-domain entropic OT (a soft plan). emd: POT's network simplex."""
    ot_tol: float = 0.002
    """Largest certified shortfall of --ot_solver auction from the optimum's improvement over the
    identity order (0.002: at least 99.8% of it; smaller costs more bidding rounds)."""
    ot_reg: float = 0.01
    """Sinkhorn regulariser, relative to the mean cost."""
    ot_max_iter: int = 2000
    """Iteration cap of sinkhorn (and the floor of emd's)."""
    ot_cost: Literal["weights", "activations"] = "weights"
    """opt-deus: unit features from weights, or from the base model's activations on calibration
    text (computed one layer at a time)."""
    calib_data: str | None = None
    """Calibration text for --ot_cost activations (a .txt/.jsonl/.json file or folder). Default: the
    training slice of the embedded Wikipedia sample."""
    calib_tokens: int = 2048
    """Calibration tokens for --ot_cost activations."""
    fuse_weight: float = 0.5
    """opt-deus: fused = (1 - t) * aligned A + t * B, with t this value."""
    zero_init: bool = True
    """opt-deus: zero o_proj and down_proj of new blocks, so the up-scaled model computes exactly
    what the base did (--no_zero_init keeps the fused values)."""
    ot_expert_cost: Literal["weights+router", "weights", "router"] = "weights+router"
    """opt-deus on mixture-of-experts blocks: the cost of pairing layer A's experts with layer B's.
    weights+router (default): their weights' squared distance after neuron OT inside the pair, plus
    their router rows' (E^2 neuron plans per block); weights: without the router rows; router: the
    router rows alone (E neuron plans, for many experts: 128 in Qwen3-MoE)."""
    seed: int = 0
    """Seed of methods that train or sample (lesa)."""


@dataclass
class EvalConfig(Checked):
    """Options of ``tools/eval_ppl.py``."""

    model: str | None = None
    """Checkpoint to evaluate (any HF causal LM directory, or a hub name). Default: the embedded
    SmolLM2-135M."""
    data: str | None = None
    """Text source, read as training reads it: a .json/.jsonl/.parquet/.txt/.md/.csv file or a folder
    of them (in .txt/.md a paragraph is a document), or a hub dataset name. Default: the held-out
    slice of the embedded Wikipedia sample."""
    text_field: str = "text"
    """Field holding the text in JSON records."""
    seq_len: int = 512
    """Window length in tokens (each window scores seq_len - 1 tokens)."""
    batch_size: int = 4
    """Windows per forward pass."""
    max_tokens: int | None = 16384
    """Stop after about this many scored tokens (0 or less: the whole source)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; auto picks cuda when visible."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype; auto is fp32 on CPU and bf16 on GPU."""
    output_json: str | None = None
    """Also write the result as JSON to this file (with every window's mean NLL, for paired
    comparisons of two models on the same windows)."""
    quiet: bool = False
    """No progress bar."""

    def _range_problems(self) -> list[str]:
        return _at_least(self, 2, "seq_len") + _at_least(self, 1, "batch_size")


@dataclass
class EvalTasksConfig(Checked):
    """Options of ``tools/eval_tasks.py``."""

    model: str | None = None
    """Checkpoint to evaluate (any HF causal LM directory: a base, a fuse_layers output, RUN_DIR/final;
    or a hub name). Default: the embedded SmolLM2-135M."""
    tasks: str = "paper"
    """paper (the paper's tasks that exist offline, plus HellaSwag and ARC-Challenge) or a
    comma-separated list of lm-eval task names (see --help's list), shipped or in --include_path."""
    include_path: str | None = None
    """A folder of your own lm-eval task definitions (YAML files, as lm-eval's own --include_path
    reads them), scored next to the shipped ones: name its tasks or groups in --tasks."""
    num_fewshot: int = 0
    """Examples in each prompt (the paper: 0)."""
    limit: int | None = None
    """Score only the first N documents of each task (for quick checks; not comparable to full scores)."""
    batch_size: str | None = None
    """lm-eval's batch size: a number, or auto. Default: auto with a GPU, 8 on CPUs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; auto picks cuda when visible."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Model weights and log-softmax dtype; auto is fp32 on CPUs and bf16 on GPUs."""
    apply_chat_template: bool = False
    """Format prompts with the model's chat template (instruction-tuned models)."""
    output_path: str = "runs/eval_tasks"
    """Where lm-eval writes its results JSON (its usual file: OUTPUT_PATH/<model>/results_<time>.json)."""
    quiet: bool = False
    """No progress bars."""

    def _range_problems(self) -> list[str]:
        out = _at_least(self, 0, "num_fewshot") + _positive(self, "limit")
        if self.batch_size is not None and self.batch_size != "auto" and not str(self.batch_size).isdigit():
            out.append(f"--batch_size takes a number or auto, got {self.batch_size!r}")
        return out


@dataclass
class StudyConfig(Checked):
    """Options of ``tools/study.py``."""

    config: str | None = None
    """The study file (YAML: base, train, budget, seeds, eval, baseline, arms; see the README).
    Default: studies/default.yaml."""
    out: str | None = None
    """Study directory (plan.json, cells/, report.md). Default: runs/study/<config name>."""
    launcher: str = "local"
    """local (cells one after another on this machine, DeepSpeed over the visible devices) or slurm
    (one chain of jobs per cell with the shipped batch scripts)."""
    ranks: int | None = None
    """Training processes per cell (with --launcher slurm: nodes x tasks per node of the jobs; it
    sets the tokens per step). Default: every visible GPU, or 2 on CPUs."""
    only: str | None = None
    """Run only this arm's cells (the plan and budget still cover every arm)."""
    quick: bool = False
    """A smoke run: only the first seed, every stage at half its steps (other cells than the full
    study's; the default study takes under 15 minutes on 2 CPUs this way)."""
    dry_run: bool = False
    """Print every arm's steps, tokens and FLOPs and every command; run nothing (plan.json is written)."""
    report_only: bool = False
    """Rebuild report.md, report.json and the plots from the finished cells; run nothing."""
    sbatch_args: str | None = None
    """Extra sbatch options for the training jobs of --launcher slurm (e.g. "--nodes=1 --ntasks-per-node=8")."""

    def _range_problems(self) -> list[str]:
        return _positive(self, "ranks")


# -- training: sections shared by launchers/cpt.py and launchers/sft.py ---------------------------


@dataclass
class ModelOptions:
    """Model: what trains, and how it runs under DeepSpeed."""

    model: str | None = None
    """Up-scaled checkpoint (an HF directory with deus_manifest.json, or a hub name). Default: the
    embedded SmolLM2-135M up-scaled by tools/fuse_layers.py's defaults (made first if missing)."""
    ds_config: str | None = None
    """DeepSpeed JSON (ds_configs/zero3.json on GPUs, zero3_cpu.json on CPU), or auto: the shipped
    config tools/plan_memory.py recommends for this model, world size and batch (the fastest that
    fits; printed with its reason; on CPUs among zero1.json, zero2.json, zero3_cpu.json). Its "auto" values
    are filled from the options below; explicit values must agree with them. Default:
    ds_configs/zero3.json when a GPU is visible, else ds_configs/zero3_cpu.json."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision: bf16 (weights and activations in bfloat16, fp32 master weights and Adam
    moments) or fp32. auto: bf16 on GPUs that support it, else fp32. Fills the DeepSpeed JSON's
    "bf16": {"enabled": "auto"}."""
    trainable: str = "new"
    """Which parameters train: new (the manifest's new_layers), all, or a regular expression
    matched (re.search) against parameter names."""
    train_embeddings: bool = False
    """Also train the embeddings and lm_head with --trainable new (--trainable all includes them)."""
    activation_checkpointing: bool = False
    """Recompute layer activations in backward (non-reentrant) to save memory."""
    zero3_leaf_layers: bool = True
    """ZeRO-3 gathers each decoder layer's parameters in one hook instead of one per sub-module
    (fewer hooks and all-gathers per step; see tools/bench_train.py)."""


@dataclass
class DataOptions(Checked):
    """Data: where it comes from and how it is cached."""

    data: str | None = None
    """Training data: a local .json/.jsonl/.parquet/.txt/.csv file or a folder of them, or a hub
    dataset name (org/name). Default: the launcher's embedded sample."""
    eval_data: str | None = None
    """Held-out data (same forms as --data). Default: the held-out slice of the embedded sample for
    the default data, else --eval_fraction of --data's records."""
    eval_fraction: float = 0.02
    """Share of --data's records held out for evaluation when --eval_data is not given (chosen with
    a fixed seed: it does not move with --seed)."""
    seq_len: int | None = None
    """Tokens per training sequence. Default: 2048 with a GPU, 256 on CPUs (tools/prepare_data.py:
    2048, or the model's context if shorter)."""
    data_cache: str | None = None
    """Where the tokenized data is cached (one folder per cache key). Default: OUTPUT_DIR/data_cache.
    On node-local scratch it is built once per node."""
    num_proc: int | None = None
    """Tokenizer processes (datasets.map). Default: up to 8 for sources of 20,000 records or more,
    else 1."""

    def _range_problems(self) -> list[str]:
        return _at_least(self, 2, "seq_len") + _positive(self, "num_proc") + _open_unit(self, "eval_fraction")


@dataclass
class TextDataOptions(DataOptions):
    """Data: plain text for continual pre-training."""

    text_field: str = "text"
    """Column holding the text."""


@dataclass
class ChatDataOptions(DataOptions):
    """Data: conversations for instruction tuning."""

    format: Literal["auto", "sharegpt", "messages", "alpaca"] = "auto"
    """Record format: sharegpt (conversations: [{from, value}]), messages (messages: [{role,
    content}]), alpaca (instruction, input, output). auto: from the columns."""
    chat_template: str | None = None
    """Chat template for a model without one (or to replace its own): chatml (built in) or a Jinja
    file. Default: the tokenizer's."""
    train_on_prompt: bool = False
    """Compute the loss on every token, not only on the assistant turns."""
    packing: bool = True
    """Several conversations per sequence, each with its own positions and no attention across
    them (--no_packing: one conversation per sequence, padded; padding never counts). A hybrid
    with Mamba layers packs only where the mamba-ssm and causal-conv1d kernels are installed."""
    truncation: Literal["turn", "drop"] = "turn"
    """A conversation longer than --seq_len is cut after its last whole assistant turn that fits
    (turn), or dropped (drop)."""


DEVICE_DEFAULTS = {
    "cuda": {"seq_len": 2048, "micro_batch": 4, "grad_accum": 8},
    "cpu": {"seq_len": 256, "micro_batch": 1, "grad_accum": 1},
}
"""--seq_len, --micro_batch and --grad_accum when not given: per device type (training and the
study's budget both read them here)."""


def device_defaults(cuda: bool) -> dict[str, int]:
    return DEVICE_DEFAULTS["cuda" if cuda else "cpu"]


def global_batch(micro_batch: int, grad_accum: int, world_size: int) -> int:
    """Sequences per optimizer step: every rank's micro-batches of one step. The one place it is
    computed (training, DeepSpeed's train_batch_size, resume checks, the study's budget)."""
    return micro_batch * grad_accum * world_size


@dataclass
class OptimOptions(Checked):
    """Optimization: batch, schedule and optimizer (global batch = micro_batch * grad_accum * world size)."""

    micro_batch: int | None = None
    """Sequences per rank per forward pass. Default: 4 with a GPU, 1 on CPUs."""
    grad_accum: int | None = None
    """Micro-batches accumulated per optimizer step. Default: 8 with a GPU, 1 on CPUs; on a resume
    with another world size, whatever keeps the checkpoint's global batch."""
    max_steps: int | None = None
    """Optimizer steps to train for. Default: from --max_tokens, else --num_epochs over --data (10
    steps on the embedded sample, a demonstration)."""
    max_tokens: int | None = None
    """Train for this many tokens (rounded up to whole steps); ignored when --max_steps is given."""
    num_epochs: float = 1.0
    """Passes over the training data when neither --max_steps nor --max_tokens is given."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 100
    """Linear warm-up steps (capped at a tenth of the run for short runs)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0: off)."""
    seed: int = 0
    """Seed of the data order and of any randomness in training."""

    def _range_problems(self) -> list[str]:
        out = _at_least(self, 1, "micro_batch", "grad_accum") + _positive(self, "max_steps", "max_tokens")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr <= 0:
            out.append(f"--lr must be positive, got {self.lr}")
        if len(self.adam_betas) != 2:
            out.append(f"--adam_betas takes two values, got {self.adam_betas}")
        return out


@dataclass
class CheckpointOptions(Checked):
    """Checkpoints: where a run writes, and how it stops and resumes."""

    output_dir: str = "runs/cpt"
    """Run directory: metrics.jsonl, checkpoints/, final/ (the exported HF checkpoint). Must be on
    a filesystem every node shares (checked at start-up)."""
    save_every: int = 0
    """Save a DeepSpeed checkpoint every N steps (0: only at the end and on SIGTERM)."""
    keep_checkpoints: int = 2
    """How many of the latest step checkpoints to keep (0: all)."""
    resume: str = "auto"
    """auto (continue from the latest checkpoint in OUTPUT_DIR/checkpoints if there is one), none,
    or the path of a checkpoint directory (OUTPUT_DIR/checkpoints or one step inside it). A
    checkpoint from another world size is converted (DeepSpeed's universal format) and continued."""
    stop_at_step: int | None = None
    """Save and stop after this step without finishing the schedule (exit status 0; resume later
    with the same options)."""
    export: bool = True
    """Export OUTPUT_DIR/final (plain HF checkpoint) at the end."""

    def _range_problems(self) -> list[str]:
        return _positive(self, "stop_at_step")


@dataclass
class RunOptions(Checked):
    """Run: evaluation during training, logging and the process group."""

    eval_every: int = 0
    """Held-out loss and perplexity every N steps (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches per rank in each evaluation (0: the whole held-out set)."""
    dist_timeout: float = 1800.0
    """Seconds a collective waits for its peers before the run fails. Data preparation and
    up-scaling never run inside a collective, so this only needs to cover a step and a save."""
    log_every: int = 1
    """Print a metrics line every N steps (metrics.jsonl gets every step)."""
    quiet: bool = False
    """No progress bar."""
    local_rank: int | None = None
    """Set by the deepspeed launcher; otherwise read from LOCAL_RANK or SLURM_LOCALID."""

    def _range_problems(self) -> list[str]:
        out = _at_least(self, 1, "log_every")
        if self.dist_timeout <= 0:
            out.append(f"--dist_timeout must be positive, got {self.dist_timeout}")
        return out


@dataclass
class TrainConfig(RunOptions, CheckpointOptions, OptimOptions, TextDataOptions, ModelOptions):
    """Options of ``launchers/cpt.py`` (continual pre-training of the inserted layers)."""


@dataclass
class SftConfig(RunOptions, CheckpointOptions, OptimOptions, ChatDataOptions, ModelOptions):
    """Options of ``launchers/sft.py`` (instruction tuning of the inserted layers)."""

    output_dir: str = "runs/sft"
    """Run directory: metrics.jsonl, checkpoints/, final/ (the exported HF checkpoint). Must be on
    a filesystem every node shares (checked at start-up)."""


@dataclass
class PrepareDataConfig(TextDataOptions):
    """Options of ``tools/prepare_data.py``: the data options of cpt.py, and the model whose tokenizer
    is used."""

    model: str | None = None
    """Checkpoint whose tokenizer is used (the up-scaled model, or its base: fuse_layers copies the
    tokenizer files, so both give the same cache key), or a hub name. Default: the embedded
    SmolLM2-135M."""
    quiet: bool = False
    """No progress bars."""
