"""Per-GPU memory of training only some layers, for each DeepSpeed sharding, before booking GPUs.

No existing estimator handles a trainable subset: DeepSpeed's ``estimate_zero3_model_states_*``
counts every parameter as trainable (its issue 5304) and neither it nor accelerate counts
activations. This one counts, per GPU, for ``N`` data-parallel ranks, ``P_f`` frozen and ``P_t``
trainable parameters and compute bytes ``e`` (2 for bf16, 4 for fp32), what DeepSpeed 0.19
allocates (read from ``runtime/zero/stage3.py`` and ``stage_1_and_2.py``):

=================  ======================  ===========================  =========================
part               ZeRO-3 (as shipped)     ZeRO-2                       ZeRO-1
=================  ======================  ===========================  =========================
frozen weights     P_f e / N               P_f e (replicated)           P_f e
trainable weights  P_t e / N               P_t e                        P_t e
gradients          P_t (e + 4) / N         P_t e / N                    P_t e (full, then reduced)
optimizer state    P_t (8 + masters) / N   P_t (8 + 4) / N              P_t (8 + 4) / N
communication      reduce bucket + one     reduce bucket(s)             reduce bucket(s)
                   gathered layer/embedding
=================  ======================  ===========================  =========================

ZeRO-3's gradients are its flat partition buffer (in the compute dtype) and the fp32 buffer its
optimizer steps on; its fp32 masters are a separate copy only in bf16 (in fp32 the partition is
the master). ZeRO-1/2 always keep an fp32 copy of their partition, and at the step they make
its fp32 gradient (``P_t 4 / N``, counted in the step phase's peak). With CPU offload (ZeRO-3 +
``offload_optimizer``/``offload_param``) every partition and the optimizer live in host memory;
the GPU holds the gathered working set, the buckets and the activations.

Saved activations start at the lowest trainable layer: below it autograd records nothing. Per
token, a Llama-style block (RMSNorm, SDPA, SwiGLU) above that layer saves each norm's fp32 input
and inverse RMS (``4d + 4``; q/k norms likewise over the heads they normalise), q/k/v and the
attention output and log-sum-exp (``e (2H + 2Hkv) hd + 4H``), and the MLP's gate, up and SiLU
outputs (``3 m e``; a mixture of experts: ``mlp_activation_bytes``; eager attention:
``attention_activation_bytes``); a layer whose weights train also saves each norm's normalised
input (``e d``) and the inputs of its linear layers (``e (2d + m)``; the output projection's
input is the attention output's storage). ZeRO-3's own ``F.linear``
(``deepspeed/runtime/zero/linear.py``) saves every linear input, frozen or not. The loss saves its
fp32 log-softmax (``4 V`` per token). With activation checkpointing each layer keeps only its
input (``e d`` per token) and one trainable layer is recomputed at a time.
These terms were counted with ``torch.autograd.graph.saved_tensors_hooks`` on transformers'
Llama; tests/test_memory_plan.py checks every part against a real 2-rank engine, and the
activations of every family (``ACTIVATIONS_CHECKED`` says which they describe).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deus_dist.errors import UserError

GiB = 1024**3

BASE_SHAPES = {
    # Base models (before up-scaling), as in their config.json: the shapes users ask about.
    "llama-3.2-1b": dict(
        num_hidden_layers=16,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "llama-3.1-70b": dict(
        num_hidden_layers=80,
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        num_hidden_layers=30,
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    # tools/bench_train.py's CPU shape (8 base layers)
    "small": dict(
        num_hidden_layers=8,
        hidden_size=512,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=8192,
        tie_word_embeddings=True,
    ),
}

SPEED_ORDER = ("zero1", "zero2", "zero3", "zero3-offload")
"""Fastest first, as measured on one H200 with most weights frozen (shared/BENCHMARKS.md: ZeRO-1
0.88x, ZeRO-2 0.84x of plain PyTorch, straight ZeRO-3 0.43-0.55x; offload moves every step's
optimizer work and parameter traffic over PCIe)."""


@dataclass(frozen=True)
class Sharding:
    """One DeepSpeed set-up the planner sizes: its ZeRO stage and buffers."""

    name: str
    stage: int
    offload: bool = False
    overlap_comm: bool = True
    """ZeRO-1/2 double their reduce bucket with overlapping communication."""
    reduce_bucket: int | None = None
    """Elements; None: DeepSpeed's "auto" as the launcher fills it (hidden_size ** 2)."""
    prefetch_bucket: int | None = None
    """ZeRO-3 elements; None: 0.9 * hidden_size ** 2."""
    persistence_threshold: int | None = None
    """ZeRO-3 keeps parameters of at most this many elements whole on every rank; None: 10 * d."""
    config: str | None = None
    """The shipped ds_configs/ file of this choice (the command to run names it)."""


def shardings(cuda: bool = True) -> list[Sharding]:
    """The choices sized, fastest first, with the settings of their shipped configs; ``cuda=False``:
    ZeRO-3 as zero3_cpu.json has it (zero1.json and zero2.json serve both)."""
    z3 = "zero3.json" if cuda else "zero3_cpu.json"
    threshold = None if cuda else 0
    return [
        Sharding("zero1", 1, config="zero1.json"),
        Sharding("zero2", 2, config="zero2.json"),
        Sharding("zero3", 3, persistence_threshold=threshold, config=z3),
        Sharding(
            "zero3-offload", 3, offload=True, persistence_threshold=threshold, config="zero3_offload.json"
        ),
    ]


ACTIVATIONS_CHECKED = (
    *("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3", "gpt_neox"),
    *("mixtral", "qwen3_moe", "olmoe", "qwen2_moe"),
)
"""Families whose saved activations the per-token terms below match, in fp32 and bf16, with the
top or every other layer training, with and without ZeRO-3's linear (measured with
``saved_tensors_hooks``; tests/test_memory_plan.py):
exactly, Gemma within 4% (its norms' fp32 gains and second rotary table are per layer, not per
token), as long as no attention window is shorter than the sequence. The two other families
save more: GPT-2 (dropout masks, its tanh-approximated GELU's intermediates, and attention on
PyTorch's math path, which dropout forces) and Bamba (state-space scans). At test scale
(tests/conftest.py's tiny configs, 2 x 8 tokens) they saved 1.3x-1.7x and 3.7x-5.6x of these terms."""


@dataclass
class ModelShape:
    """Parameter counts of the up-scaled model, per layer and split frozen / trainable, and the
    sizes the activation terms need."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_params: list[int]
    trainable_layer_params: list[int]
    other_params: int
    """Embeddings, output head and final norm."""
    trainable_other: int
    norms_per_layer: int
    new_layers: list[int]
    largest_tensor: int
    """Elements of the largest single parameter (ZeRO-3 gathers at least this much at once)."""
    largest_trainable: int = 0
    """Elements of the largest trainable parameter (ZeRO-1/2's gradient partition holds whole
    parameters: a rank's share plus at most one that straddles its boundary)."""
    params_1d_per_layer: list[int] = field(default_factory=list)
    """Elements of each layer's small (1-d) tensors: norms and biases."""
    experts: int = 0
    """Routed experts per layer (0: a dense MLP)."""
    experts_per_tok: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    """Width of a shared expert beside the routed ones (Qwen2-MoE), 0 if none."""
    layer_norm: bool = False
    """LayerNorms (with bias, GPT-NeoX): each keeps its input in the compute dtype and its mean and
    inverse deviation, not an fp32 copy or a normalised input."""
    parallel_residual: bool = False
    """Attention and MLP read the same layer input (GPT-NeoX), so their norms share one input."""
    gated_mlp: bool = True
    """A gated MLP (SwiGLU); False: one up projection and a GELU (GPT-NeoX)."""
    fused_qkv: bool = False
    """q, k and v come from one fused projection (Phi-3's qkv_proj)."""
    eager_attention: bool = False
    """transformers' eager attention: the model class has no SDPA (Gemma-2)."""
    attn_softcap: bool = False
    final_softcap: bool = False
    fp32_norm_gains: bool = False
    """Its RMSNorms multiply their gain in fp32 (Gemma, OLMo-2): a trainable norm keeps its
    normalised input in fp32."""
    pre_norm: bool = True
    """Its first norm reads the layer input (False: post-norm, OLMo-2: norms read sublayer outputs)."""
    qk_norm_width: int = 0
    """Elements per token that a layer's query/key norms (Qwen3, OLMo-2, Gemma-3) normalise."""
    qk_norm_vectors: int = 0
    """Vectors per token they normalise (one inverse RMS each)."""
    model_type: str = "llama"
    sliding_window: int | None = None
    """The smallest attention window of the model's sliding-window layers (None: none)."""

    def activations_checked(self, seq_len: int) -> bool:
        """Whether the activation terms are those of this model's blocks: its family is one they
        were checked against (``ACTIVATIONS_CHECKED``) and every attention window is longer than
        ``seq_len``. transformers leaves the mask out (SDPA's ``is_causal``) only for a sequence
        shorter than the window; otherwise SDPA takes a mask, and keeps it."""
        window_ok = self.sliding_window is None or self.sliding_window > seq_len
        return self.model_type in ACTIVATIONS_CHECKED and window_ok

    @property
    def total(self) -> int:
        return sum(self.layer_params) + self.other_params

    @property
    def trainable(self) -> int:
        return sum(self.trainable_layer_params) + self.trainable_other

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def lowest_trainable(self) -> int:
        t = [i for i, p in enumerate(self.trainable_layer_params) if p]
        return 0 if self.trainable_other else (min(t) if t else self.num_layers)


def shape_from_config(
    config: dict,
    new_layers: list[int],
    trainable: str = "new",
    train_embeddings=False,
    trainable_names: set[str] | None = None,
):
    """Exact parameter counts from the transformers model of ``config`` built on the meta device
    (no memory, any family transformers knows), split by the layers that train: ``new_layers``
    (or every layer with ``trainable="all"``), or exactly the parameters in ``trainable_names``."""
    from transformers import AutoConfig

    from deus_dist.architectures import architecture_for
    from deus_dist.checkpoint.layout import meta_model_from_config
    from deus_dist.train.model import causal_lm_class

    arch = architecture_for(config)
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures",)})
    model = meta_model_from_config(cfg)  # outside a live ZeRO-3 context too
    n = cfg.num_hidden_layers
    layer, train, small = [0] * n, [0] * n, [0] * n
    other = other_train = 0
    norms = 0
    qk_norms: list[tuple[str, int]] = []  # (q or k, the norm's size) of a layer's query/key norms
    new = set(range(n)) if trainable == "all" else set(new_layers)
    largest = largest_train = 0
    for name, p in model.named_parameters():
        numel = p.numel()
        largest = max(largest, numel)
        split = arch.split_name(name)
        if split is None:
            other += numel
            trains = (
                name in trainable_names
                if trainable_names is not None
                else train_embeddings or trainable == "all"
            )
            if trains:
                other_train += numel
                largest_train = max(largest_train, numel)
            continue
        i, suffix = split
        layer[i] += numel
        if name in trainable_names if trainable_names is not None else i in new:
            train[i] += numel
            largest_train = max(largest_train, numel)
        if p.dim() == 1:
            small[i] += numel
            if i == 0 and suffix.endswith(("q_norm.weight", "k_norm.weight")):
                qk_norms.append(("q" if suffix.endswith("q_norm.weight") else "k", numel))
            elif i == 0 and numel == cfg.hidden_size and "norm" in suffix and suffix.endswith("weight"):
                norms += 1
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    # a query/key norm normalises every head's vector (size head_dim) or the whole projection
    qk_width = sum((heads if which == "q" else kv_heads) * head_dim for which, _ in qk_norms)
    inputs = [r for r in arch.block.values() if r.cols == "residual"]  # projections of the layer input
    experts = int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)
    qk_vectors = sum((heads if which == "q" else kv_heads) * head_dim // size for which, size in qk_norms)
    return ModelShape(
        num_layers=n,
        hidden=cfg.hidden_size,
        # GPT-2 calls it n_inner, None meaning 4 x n_embd (GPT2Config)
        intermediate=arch.config_value(config, "intermediate_size") or 4 * cfg.hidden_size,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=cfg.vocab_size,
        layer_params=layer,
        trainable_layer_params=train,
        other_params=other,
        trainable_other=other_train,
        norms_per_layer=norms or 2,
        new_layers=sorted(i for i, t in enumerate(train) if t),
        largest_tensor=largest,
        largest_trainable=largest_train,
        params_1d_per_layer=small,
        model_type=cfg.model_type,
        sliding_window=_smallest_window(cfg),
        experts=experts,
        layer_norm=any(role.norm and suffix.endswith(".bias") for suffix, role in arch.block.items()),
        parallel_residual=bool(getattr(cfg, "use_parallel_residual", False)),
        gated_mlp=sum(r.row_spaces.count("mlp") for r in inputs) != 1,
        fused_qkv=sum(set(r.row_spaces) <= {"q_heads", "kv_heads"} for r in inputs) == 1,
        eager_attention=not getattr(causal_lm_class(cfg), "_supports_sdpa", True),
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None) is not None,
        final_softcap=getattr(cfg, "final_logit_softcapping", None) is not None,
        fp32_norm_gains=arch.fp32_norm_gains,
        pre_norm=arch.pre_norm,
        experts_per_tok=int(getattr(cfg, "num_experts_per_tok", 0) or 0) if experts else 0,
        expert_intermediate=int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
        if experts
        else 0,
        shared_intermediate=int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0) if experts else 0,
        qk_norm_width=qk_width,
        qk_norm_vectors=qk_vectors,
    )


def _smallest_window(cfg) -> int | None:
    """The attention window of the config's sliding-window layers, None when it has none (a
    ``layer_types`` list without "sliding_attention", or no ``sliding_window``)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(window)


def upscaled_config(base: dict, num_layers: int) -> dict:
    """The base config with the up-scaled layer count (per-layer lists do not change sizes)."""
    out = {k: v for k, v in base.items() if k not in ("layer_types", "max_window_layers")}
    out["num_hidden_layers"] = num_layers
    out.setdefault("model_type", "llama")
    return out


def layout(
    base_layers: int, method: str, placement: str | None, num_new: int | None
) -> tuple[int, list[int]]:
    """(layers after, new layer indices) of the fuse tool's own plan for this base and method."""
    from deus_dist.configs import FuseConfig
    from deus_dist.methods import get_method

    plan = get_method(method).plan(
        base_layers, FuseConfig(method=method, placement=placement, num_new=num_new)
    )
    if not plan.new_layers:
        raise UserError(f"--placement {placement}: the plan has no new layers; nothing would train")
    return plan.num_layers_after, plan.new_layers


@dataclass(frozen=True)
class RunShape:
    """What the training run looks like."""

    gpus_per_node: int = 8
    nodes: int = 1
    seq_len: int = 2048
    micro_batch: int = 4
    grad_accum: int = 1
    """Micro-batches per step: ZeRO-1 keeps full gradients between them."""
    precision: str = "bf16"
    activation_checkpointing: bool = False
    zero3_leaf_layers: bool = True
    """The engine's ZeRO-3 leaf hook makes the lowest trainable layer's input require grad."""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def elem(self) -> int:
        return 2 if self.precision in ("bf16", "fp16") else 4


def mlp_activation_bytes(s: ModelShape, e: int, *, trainable: bool, zero3: bool) -> float:
    """Bytes a layer's MLP saves per token beyond its input (which the layer term counts).

    A SwiGLU MLP keeps its gate, up and SiLU outputs (``3 m e``), and the down projection's input
    when it trains (or under ZeRO-3's own linear). A mixture of experts (transformers' grouped
    experts, ``integrations/moe.py``) keeps the router's fp32 probabilities and top-k indices, the
    sort permutation, sorted expert ids and scatter index (int64), and for each of the token's k
    experts its gate/up output, SiLU output, routing weight and weighted output; when it trains
    also the gathered input and the down projection's input. A shared expert (Qwen2-MoE) is a
    SwiGLU MLP beside them, with a sigmoid gate that keeps its output and the expert's output.
    Grouped expert matmuls are not ``F.linear``, so ZeRO-3 changes only the router and shared expert."""
    d = s.hidden
    if not s.experts:
        kept = 3 if s.gated_mlp else 1  # gate, up and SiLU outputs; or the GELU's input
        return kept * s.intermediate * e + (s.intermediate * e if trainable or zero3 else 0)
    k, me = s.experts_per_tok, s.expert_intermediate
    b = 4 * s.experts + 8 * k + 3 * 8 * k  # router: probabilities, indices; permutation, ids, index
    b += k * (3 * me * e + 4 + d * e)  # gate/up and SiLU outputs, routing weight, weighted output
    if trainable:
        b += k * (d + me) * e  # gathered input, down projection's input
    if s.shared_intermediate:
        ms = s.shared_intermediate
        b += 3 * ms * e + e + d * e  # shared SwiGLU; its gate's sigmoid, its output
        b += ms * e if trainable or zero3 else 0
    return b


def attention_activation_bytes(s: ModelShape, e: int, seq_len: int, *, trainable: bool, zero3: bool) -> float:
    """Bytes a layer's attention saves per token. SDPA keeps q, k, v, its output and the fp32
    log-sum-exp. transformers' eager attention (a model class without SDPA, Gemma-2) keeps q and
    k, v repeated to every head, the fp32 softmax and the probabilities in the compute dtype (a
    row of ``seq_len`` scores per head and token), the tanh of soft-capped scores, and the output
    only where the output projection needs it for its weight gradient. On a GPU where FlashAttention
    is installed the run uses it instead (``train.model.attention_implementation``) and saves no
    scores, so for such a model the plan is then an upper bound."""
    hd = s.head_dim
    if not s.eager_attention:
        b = e * (2 * s.heads + 2 * s.kv_heads) * hd + 4 * s.heads
        if s.fused_qkv:
            # v is a view of the fused q/k/v output, whose whole storage stays; the attention output
            # is copied before the output projection, which keeps the copy when it needs it
            b += e * (s.heads + s.kv_heads) * hd + (e * s.heads * hd if trainable or zero3 else 0)
        return b
    b = e * 3 * s.heads * hd + s.heads * seq_len * (4 + e + (e if s.attn_softcap else 0))
    return b + (e * s.heads * hd if trainable or zero3 else 0)


def layer_activation_bytes(
    s: ModelShape, e: int, *, trainable: bool, input_grad: bool, zero3: bool, seq_len: int = 0
) -> float:
    """Bytes one decoder layer saves for backward, per token (see the module docstring)."""
    d = s.hidden
    norms = s.norms_per_layer
    b = 0.0
    if s.layer_norm:  # the inputs (one, shared, with a parallel residual), means and deviations
        b += (1 if s.parallel_residual else norms) * e * d + norms * 2 * e
    else:  # each norm keeps its fp32 input and inverse RMS; the first one's input is the layer input
        b += (norms - (0 if input_grad or not s.pre_norm else 1)) * (4 * d + 4)
    b += 4 * s.qk_norm_width + 4 * s.qk_norm_vectors  # query/key norms: fp32 input, inverse RMS
    b += attention_activation_bytes(s, e, seq_len, trainable=trainable, zero3=zero3)
    b += mlp_activation_bytes(s, e, trainable=trainable, zero3=zero3)
    if trainable and not s.layer_norm:
        # normalised inputs, for the norms' weight gradients
        b += (4 if s.fp32_norm_gains else e) * (norms * d + s.qk_norm_width)
    if trainable or zero3:
        b += e * 2 * d  # inputs of q/k/v and of the MLP (gate/up, or the router)
    return b


def activation_bytes(s: ModelShape, run: RunShape, zero3: bool) -> dict[str, float]:
    """Saved activation bytes of one micro-batch per GPU, and the working memory beside them."""
    e, tokens = run.elem, run.micro_batch * run.seq_len
    low = s.lowest_trainable
    d, v = s.hidden, s.vocab
    trainable_layers = [i for i, p in enumerate(s.trainable_layer_params) if p]
    per_layer = []
    for i in range(low, s.num_layers):
        train = i in trainable_layers
        input_grad = i > low or (zero3 and run.zero3_leaf_layers) or s.trainable_other > 0
        per_layer.append(
            layer_activation_bytes(
                s, e, trainable=train, input_grad=input_grad, zero3=zero3, seq_len=run.seq_len
            )
        )
    # final norm's input and statistics; fp32 log-softmax; labels
    head = (e * d + 2 * e if s.layer_norm else 4 * d + 4) + 4 * v + 8
    head += e * v if s.final_softcap else 0  # the tanh of soft-capped logits (Gemma-2)
    head += e * d if zero3 else 0  # ZeRO-3's linear keeps the head's input
    rope = 2 * s.head_dim * e * run.seq_len  # cos and sin of one sequence, shared by every layer
    if run.activation_checkpointing:
        saved = tokens * (s.num_layers * e * d + head) + rope
        recompute = tokens * max(per_layer, default=0.0)
    else:
        saved = tokens * (sum(per_layer) + head) + rope
        recompute = 0.0
    # logits in the compute dtype and their fp32 copy while the loss runs; in backward the
    # log-softmax's fp32 gradient and the logits' gradient
    logits = tokens * v * (e + 4 + (4 if e < 4 else 0))
    # the head's work ends before the first layer is recomputed: the larger of the two
    return {"saved": saved, "working": max(logits, recompute)}


def _pad(n: int, world: int) -> int:
    return math.ceil(n / world) if n else 0


@dataclass
class ChoicePlan:
    name: str
    stage: int
    offload: bool
    parts: dict[str, int]
    """Per GPU bytes: frozen_weights, trainable_weights, gradients, optimizer_state,
    activations, communication, working."""
    host: dict[str, int]
    """Per rank bytes kept in host memory (CPU offload), by part."""
    peak: int
    """Per GPU peak: the larger of the forward/backward phase and the optimizer step's."""
    fits: bool = False
    config: str | None = None
    note: str = ""

    @property
    def total(self) -> int:
        return self.peak


def plan_choice(s: ModelShape, run: RunShape, sh: Sharding) -> ChoicePlan:
    """Per-GPU bytes of each part for one sharding (the table in the module docstring)."""
    n, e = run.world, run.elem
    d = s.hidden
    bf16 = e < 4
    bucket = sh.reduce_bucket if sh.reduce_bucket is not None else d * d
    if sh.stage == 3:
        threshold = sh.persistence_threshold if sh.persistence_threshold is not None else 10 * d
        # small tensors (norms) below the persistence threshold stay whole on every rank
        persist = sum(p for p in s.params_1d_per_layer) if threshold >= d else 0
        frozen_persist = persist - sum(
            p for i, p in enumerate(s.params_1d_per_layer) if s.trainable_layer_params[i]
        )
        frozen = _pad(s.frozen - frozen_persist, n) * e + frozen_persist * e
        trainable = _pad(s.trainable, n) * e
        # the flat gradient partition in the compute dtype; with offload also its fp32 copy (host)
        grads = _pad(s.trainable, n) * (e + (4 if sh.offload else 0))
        optim = _pad(s.trainable, n) * (8 + 4)  # moments and fp32 masters (measured: a copy in fp32 too)
        layer_full = max(s.layer_params) * e
        prefetch = (sh.prefetch_bucket if sh.prefetch_bucket is not None else int(0.9 * d * d)) * e
        gathered = max(layer_full + prefetch, s.largest_tensor * e)
        comm = bucket * e + gathered
        step_grad = _pad(s.trainable, n) * 4 if bf16 and not sh.offload else 0  # fp32 gradient at the step
    else:
        frozen = s.frozen * e
        trainable = s.trainable * e
        # ZeRO-2 reduces in buckets into this rank's partition (whole parameters); so does ZeRO-1 at
        # the step's last micro-batch, but before it keeps every full gradient (stage_1_and_2.py's
        # reduce_ready_partitions_and_remove_grads)
        grads = (_pad(s.trainable, n) + (s.largest_trainable if n > 1 else 0)) * e
        if sh.stage == 1 and run.grad_accum > 1:
            grads = s.trainable * e
        optim = _pad(s.trainable, n) * (8 + 4)
        comm = bucket * e * (2 if sh.overlap_comm else 1)
        step_grad = _pad(s.trainable, n) * 4  # the fp32 gradient of the partition, made at the step
    acts = activation_bytes(s, run, zero3=sh.stage == 3)
    parts = {
        "frozen_weights": int(frozen),
        "trainable_weights": int(trainable),
        "gradients": int(grads),
        "optimizer_state": int(optim),
        "activations": int(acts["saved"]),
        "communication": int(comm),
        "working": int(acts["working"]),
    }
    host: dict[str, int] = {}
    if sh.offload:
        for key in ("frozen_weights", "trainable_weights", "gradients", "optimizer_state"):
            host[key] = parts[key]
            parts[key] = 0
    backward = sum(parts.values())
    step = sum(v for k, v in parts.items() if k not in ("activations", "working")) + step_grad
    return ChoicePlan(sh.name, sh.stage, sh.offload, parts, host, max(backward, step), config=sh.config)


@dataclass
class MemoryPlan:
    model: str
    shape: dict
    run: dict
    gpu_memory: int
    headroom: float
    choices: list[ChoicePlan]
    recommended: str | None
    reasons: list[str]

    def to_json(self) -> dict:
        out = asdict(self)
        for c in out["choices"]:
            c["total"] = c["peak"]
        return out


def make_plan(
    s: ModelShape,
    run: RunShape,
    *,
    gpu_memory_gib: float,
    headroom: float = 0.1,
    model: str = "",
    cuda: bool = True,
    host_memory_gib: float | None = None,
) -> MemoryPlan:
    """Every choice's parts, and the fastest that fits ``gpu_memory_gib`` with ``headroom`` left
    (or, when none fits, what would: more GPUs, activation checkpointing, offload)."""
    budget = gpu_memory_gib * GiB * (1 - headroom)
    choices = [plan_choice(s, run, sh) for sh in shardings(cuda)]
    for c in choices:
        c.fits = c.peak <= budget
        if c.fits and host_memory_gib is not None and c.host:
            per_node_host = sum(c.host.values()) * run.gpus_per_node
            c.fits = per_node_host <= host_memory_gib * GiB
            if not c.fits:
                c.note = f"needs {per_node_host / GiB:.1f} GiB host memory per node"
    order = {name: i for i, name in enumerate(SPEED_ORDER)}
    fitting = sorted((c for c in choices if c.fits), key=lambda c: order[c.name])
    reasons = []
    recommended = fitting[0].name if fitting else None
    if recommended:
        best = fitting[0]
        faster = [c for c in choices if order[c.name] < order[best.name]]
        why = f"{best.name} is the fastest choice that fits: {best.peak / GiB:.1f} GiB of {budget / GiB:.1f} GiB"
        why += f" ({gpu_memory_gib:g} GiB less {headroom:.0%} headroom)"
        if faster:
            why += "; faster but too big: " + ", ".join(f"{c.name} {c.peak / GiB:.1f} GiB" for c in faster)
        reasons.append(why)
    else:
        reasons += _what_would_fit(s, run, budget, cuda, choices)
    if not s.activations_checked(run.seq_len):
        reasons.append(activations_caveat(s, run.seq_len))
    return MemoryPlan(
        model=model,
        shape={
            "layers": s.num_layers,
            "new_layers": s.new_layers,
            "lowest_trainable": s.lowest_trainable,
            "params": s.total,
            "trainable_params": s.trainable,
        },
        run=asdict(run) | {"world_size": run.world},
        gpu_memory=int(gpu_memory_gib * GiB),
        headroom=headroom,
        choices=choices,
        recommended=recommended,
        reasons=reasons,
    )


def activations_caveat(s: ModelShape, seq_len: int) -> str:
    """What a plan says when its activation terms are not checked for this model."""
    if s.model_type in ACTIVATIONS_CHECKED:
        why = (
            f"its {s.sliding_window}-token attention window is not longer than --seq_len {seq_len}, "
            "so attention takes a mask the estimate leaves out"
        )
    else:
        why = (
            "they are counted from the parts of a decoder block (norms, attention, MLP or routed "
            f"experts) and checked for "
            f"{', '.join(ACTIVATIONS_CHECKED)} only; {s.model_type} blocks save other tensors, "
            "and at test scale the other families saved 1.3x to 5.6x the estimate"
        )
    return (
        f"activations are an estimate for this model, not checked against measurement: {why}. "
        "Leave more --headroom, or measure: a short run's metrics.jsonl records its measured "
        "peak_memory_gb beside planned_memory_gb"
    )


def _what_would_fit(s: ModelShape, run: RunShape, budget: float, cuda: bool, choices) -> list[str]:
    import dataclasses

    best = min(choices, key=lambda c: c.peak)
    out = [
        f"nothing fits: the smallest, {best.name}, needs {best.peak / GiB:.1f} GiB per GPU, "
        f"{(best.peak - budget) / GiB:.1f} GiB more than the {budget / GiB:.1f} GiB available"
    ]
    z3 = next(sh for sh in shardings(cuda) if sh.name == "zero3")
    for nodes in (2, 4, 8, 16, 32, 64):
        if nodes <= run.nodes:
            continue
        more = dataclasses.replace(run, nodes=nodes)
        if plan_choice(s, more, z3).peak <= budget:
            out.append(f"zero3 fits on {nodes} nodes of {run.gpus_per_node} GPUs (--nodes {nodes})")
            break
    if not run.activation_checkpointing:
        ck = dataclasses.replace(run, activation_checkpointing=True)
        fits = [sh.name for sh in shardings(cuda) if plan_choice(s, ck, sh).peak <= budget]
        if fits:
            out.append(f"with --activation_checkpointing: {', '.join(fits)} fit")
    if run.micro_batch > 1:
        one = dataclasses.replace(run, micro_batch=1)
        fits = [sh.name for sh in shardings(cuda) if plan_choice(s, one, sh).peak <= budget]
        if fits:
            out.append(
                f"with --micro_batch 1 (more --grad_accum for the same global batch): {', '.join(fits)} fit"
            )
    return out


PART_LABELS = {
    "frozen_weights": "frozen",
    "trainable_weights": "train W",
    "gradients": "grads",
    "optimizer_state": "optim",
    "activations": "acts",
    "communication": "comm",
    "working": "working",
}


def format_plan(plan: MemoryPlan) -> list[str]:
    """One line per choice, figures in GiB per GPU, then the recommendation and its command."""
    r = plan.run
    lines = [
        f"model {plan.model}: {plan.shape['layers']} layers, {plan.shape['params'] / 1e9:.2f}B params, "
        f"{plan.shape['trainable_params'] / 1e9:.3f}B trainable (new layers {plan.shape['new_layers']}, "
        f"activations kept from layer {plan.shape['lowest_trainable']} up)",
        f"run: {r['nodes']} node(s) x {r['gpus_per_node']} GPUs, micro-batch {r['micro_batch']} x "
        f"{r['seq_len']} tokens, {r['precision']}, activation checkpointing "
        f"{'on' if r['activation_checkpointing'] else 'off'}; GPU memory {plan.gpu_memory / GiB:g} GiB",
        "per GPU, GiB:",
        f"{'choice':14}" + "".join(f"{v:>9}" for v in PART_LABELS.values()) + f"{'peak':>9}{'host':>9}  fits",
    ]
    for c in plan.choices:
        host = f"{sum(c.host.values()) / GiB:9.2f}" if c.host else f"{'-':>9}"
        lines.append(
            f"{c.name:14}"
            + "".join(f"{c.parts[k] / GiB:9.2f}" for k in PART_LABELS)
            + f"{c.peak / GiB:9.2f}{host}  {'yes' if c.fits else 'no'}{'  ' + c.note if c.note else ''}"
        )
    lines += plan.reasons
    if plan.recommended:
        c = next(c for c in plan.choices if c.name == plan.recommended)
        cfg = f"ds_configs/{c.config}" if c.config else "auto"
        launch = (
            f"deepspeed --num_gpus {r['gpus_per_node']}"
            if r["nodes"] == 1
            else f"sbatch --nodes {r['nodes']} launchers/slurm/cpt.sbatch"
        )
        ck = " --activation_checkpointing" if r["activation_checkpointing"] else ""
        lines.append(
            f"run it: {launch} launchers/cpt.py --ds_config {cfg} --model MODEL --micro_batch "
            f"{r['micro_batch']} --seq_len {r['seq_len']} --precision {r['precision']}{ck}"
        )
    return lines


def format_placements(rows: dict[str, MemoryPlan]) -> list[str]:
    """The placements side by side: peak GiB per GPU of each choice, and saved activations."""
    names = [c.name for c in next(iter(rows.values())).choices]
    lines = [
        "placements side by side (peak GiB per GPU; activations are kept from the lowest new layer up):",
        f"{'placement':12}{'lowest new':>11}{'acts z3':>9}"
        + "".join(f"{n:>15}" for n in names)
        + "  fastest fit",
    ]
    for placement, plan in rows.items():
        by = {c.name: c for c in plan.choices}
        lines.append(
            f"{placement:12}{plan.shape['lowest_trainable']:>11}{by['zero3'].parts['activations'] / GiB:9.2f}"
            + "".join(f"{by[n].peak / GiB:15.2f}" for n in names)
            + f"  {plan.recommended or 'none'}"
        )
    return lines


def read_config_json(path: str, option: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{option}: {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{option}: {p} is not valid JSON ({e})") from None


def sharding_of(ds: dict, config: str | None = None) -> Sharding:
    """The choice a resolved DeepSpeed config makes: its ZeRO stage, CPU offload and buffer sizes,
    read by DeepSpeed's own ``DeepSpeedZeroConfig`` (so a size the config leaves out is DeepSpeed's
    default, e.g. a 5e8-element reduce bucket, and ``overlap_comm`` defaults to ZeRO-3 only)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
    stage = int(zero.stage)
    offload = any(
        o is not None and str(getattr(o.device, "value", o.device)) != "none"
        for o in (zero.offload_optimizer, zero.offload_param)
    )
    return Sharding(
        f"zero{stage}" + ("-offload" if offload else ""),
        stage,
        offload=offload,
        overlap_comm=bool(zero.overlap_comm),
        reduce_bucket=int(zero.reduce_bucket_size),
        prefetch_bucket=int(zero.prefetch_bucket_size),
        persistence_threshold=int(zero.param_persistence_threshold),
        config=config,
    )


def plan_run(config: dict, trainable: set[str], run: RunShape, ds: dict) -> ChoicePlan:
    """The planned per-device bytes of a training run as launched: its model, exactly its
    ``trainable`` tensors, and its resolved DeepSpeed config (what metrics.jsonl records beside the
    measured peak)."""
    if int(ds.get("zero_optimization", {}).get("stage", 0)) not in (1, 2, 3):
        raise UserError("--ds_config: the memory planner sizes ZeRO stages 1, 2 and 3 only")
    shape = shape_from_config(config, [], trainable_names=set(trainable))
    plan = plan_choice(shape, run, sharding_of(ds))
    if not shape.activations_checked(run.seq_len):
        plan.note = activations_caveat(shape, run.seq_len)
    return plan


def auto_ds_config(
    config: dict,
    trainable: set[str],
    run: RunShape,
    *,
    cuda: bool,
    memory_gib: float | None = None,
    headroom: float = 0.1,
    zero3: bool | None = None,
) -> tuple[Path, str]:
    """``--ds_config auto``: the shipped config the planner recommends for this run, and why.

    On GPUs it chooses among zero1.json, zero2.json, zero3.json and zero3_offload.json against
    the first GPU's memory; on CPUs among the CPU configs (zero1.json, zero2.json, zero3_cpu.json)
    against this machine's memory shared by its ranks, so the same command runs in tests. A model
    whose frozen weights do not fit on one device gets ZeRO-3, as shipped. Nothing fitting is a
    UserError naming the shortfall in GiB. ``zero3`` (a resume): only ZeRO-3 configs (True) or only
    ZeRO-1/2 ones (False), those that read the checkpoint."""
    from deus_dist.resources import DS_CONFIGS

    if memory_gib is None:
        if cuda:
            import torch

            memory_gib = torch.cuda.get_device_properties(0).total_memory / GiB
        else:
            import psutil

            memory_gib = psutil.virtual_memory().total / GiB / run.world
    shape = shape_from_config(config, [], trainable_names=set(trainable))
    plan = make_plan(shape, run, gpu_memory_gib=memory_gib, headroom=headroom, cuda=cuda)
    # offload moves nothing on a CPU: not a CPU choice
    plan.choices = [
        c for c in plan.choices if (cuda or not c.offload) and (zero3 is None or (c.stage == 3) == zero3)
    ]
    fitting = [c for c in plan.choices if c.fits]
    plan.recommended = min(fitting, key=lambda c: SPEED_ORDER.index(c.name)).name if fitting else None
    where = "GPU" if cuda else f"rank (this machine's memory over {run.world} rank(s))"
    # make_plan's reasons end with the activations caveat when there is one; it is not advice
    caveat = None if shape.activations_checked(run.seq_len) else activations_caveat(shape, run.seq_len)
    if plan.recommended is None:
        best = min(plan.choices, key=lambda c: c.peak)
        budget = memory_gib * (1 - headroom)
        advice = [r for r in plan.reasons[1:] if r != caveat]
        raise UserError(
            f"--ds_config auto: no shipped config fits {memory_gib:.1f} GiB per {where}: the smallest, "
            f"{best.name}, needs {best.peak / GiB:.1f} GiB, {(best.peak - budget) / GiB:.1f} GiB more than the "
            f"{budget:.1f} GiB usable; "
            + "; ".join(
                (advice or ["use more GPUs, --activation_checkpointing or a smaller --micro_batch"])
                + ([caveat] if caveat else [])
            )
        )
    chosen = next(c for c in plan.choices if c.name == plan.recommended)
    others = ", ".join(f"{c.name} {c.peak / GiB:.2f}" for c in plan.choices if c is not chosen)
    why = (
        f"--ds_config auto: ds_configs/{chosen.config} ({chosen.name}), the fastest that fits: "
        f"{chosen.peak / GiB:.2f} GiB planned per {where} of {memory_gib:.1f} GiB less {headroom:.0%} headroom "
        f"(others, GiB: {others})"
    )
    if caveat:
        why += "; " + caveat
    return DS_CONFIGS / chosen.config, why
