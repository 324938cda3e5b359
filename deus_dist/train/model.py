"""The model of a training run: loaded (into ZeRO-3 partitions as it loads, when the DeepSpeed
config says stage 3), every parameter but the trainable set frozen, and wrapped in DeepSpeed's
engine with only the trainable parameters in its optimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deus_dist.errors import UserError
from deus_dist.hf_logging import quiet_transformers
from deus_dist.train.ds_config import compute_dtype

if TYPE_CHECKING:
    from deus_dist.train.setup import TrainSetup


def param_groups(model, trainable: set[str], weight_decay: float) -> list[dict]:
    """Trainable parameters only; no decay on norms and biases (1-d tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name in trainable:
            shape = getattr(p, "ds_shape", p.shape)
            (decay if len(shape) > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def causal_lm_class(config):
    """The transformers class AutoModelForCausalLM builds for ``config``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UserError(
            f"--model: transformers has no causal language model for model_type {config.model_type!r}"
        ) from None


def attention_implementation(ds: dict, model_class=None) -> str:
    """FlashAttention 2 on GPUs where it is installed, the compute dtype allows it and the model
    supports it (its varlen kernels run packed conversations without a mask), else PyTorch's SDPA
    (packed conversations get a block-diagonal causal mask from transformers), else, for a model
    without SDPA support (Gemma-2: its attention soft-caps the scores), transformers' eager
    attention."""
    import importlib.util

    def supports(flag: str) -> bool:
        return model_class is None or bool(getattr(model_class, flag, False))

    if (
        torch.cuda.is_available()
        and compute_dtype(ds) != torch.float32
        and importlib.util.find_spec("flash_attn")
        and supports("_supports_flash_attn")
    ):
        return "flash_attention_2"
    return "sdpa" if supports("_supports_sdpa") else "eager"


RECURRENT = "linear_attention"
"""transformers' layer type of a recurrent layer (a Mamba state-space layer of a hybrid such as Bamba)."""
PACKED_SEQUENCE_KERNELS = ("mamba_ssm", "causal_conv1d")
"""The packages whose kernels keep packed sequences apart inside recurrent layers (transformers'
PyTorch fallbacks cannot, and refuse the sequence index that asks them to)."""


def recurrent_layers(config) -> bool:
    """Whether a transformers config has recurrent layers."""
    return RECURRENT in (getattr(config, "layer_types", None) or ())


def missing_packed_sequence_kernels() -> list[str]:
    import importlib.util

    return [name for name in PACKED_SEQUENCE_KERNELS if importlib.util.find_spec(name) is None]


def model_inputs(model, batch: dict) -> dict:
    """``batch`` as ``model``'s layers keep packed conversations apart.

    - **Attention.** SDPA and eager attention get a block-diagonal mask that transformers builds
      from the restarting position ids, row by row. Its FlashAttention path finds packed sequences
      only in a batch of one row (``modeling_flash_attention_utils._is_packed_sequence``,
      transformers 5.24); in a batch of several rows it would attend across conversations. So a
      micro-batch of packed rows goes to FlashAttention as one row of all its tokens. The varlen
      kernel then keeps each conversation, and each row's padding, to itself, at the cost of the
      separate rows. Each row's first label is made IGNORE first: in one row the previous row's
      last token would predict it, and as separate rows no token does (packed rows start with a
      conversation, whose first label is IGNORE anyway).
    - **Recurrent layers** (Mamba in a hybrid) carry their state along a row whatever the mask.
      They get ``seq_idx``, each token's conversation within its row (int32), which the
      mamba-ssm and causal-conv1d kernels read to restart their state; launch setup refuses
      packing where those are not installed (``missing_packed_sequence_kernels``).
    """
    from deus_dist.train.pipeline import IGNORE

    if "position_ids" not in batch or "attention_mask" in batch:
        return batch  # one document or one padded conversation per row
    implementation = getattr(model.config, "_attn_implementation", None) or ""
    if "flash" in implementation and batch["input_ids"].shape[0] > 1:
        labels = batch["labels"].clone()
        labels[:, 0] = IGNORE
        batch = {k: v.reshape(1, -1) for k, v in {**batch, "labels": labels}.items()}
    if recurrent_layers(model.config):
        starts = (batch["position_ids"] == 0).int()
        batch = {**batch, "seq_idx": (starts.cumsum(dim=1) - 1).to(torch.int32)}
    return batch


def load_model(source, ds: dict, activation_checkpointing: bool):
    """(model, hf_ds_config): ``source`` is a checkpoint directory, or a transformers config (random
    weights, for benchmarks). Under ZeRO-3 the weights are partitioned as they load."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # Must stay alive through from_pretrained: it makes transformers load into ZeRO-3 partitions.
    hf_ds = HfDeepSpeedConfig(ds) if ds.get("zero_optimization", {}).get("stage") == 3 else None
    with quiet_transformers(True):
        config = AutoConfig.from_pretrained(source) if isinstance(source, (str, Path)) else source
        kw = {
            "dtype": compute_dtype(ds),
            "attn_implementation": attention_implementation(ds, causal_lm_class(config)),
        }
        if isinstance(source, (str, Path)):
            model = AutoModelForCausalLM.from_pretrained(source, config=config, **kw)
        else:
            model = AutoModelForCausalLM.from_config(source, **kw)
    model.config.use_cache = False
    if activation_checkpointing:
        # Non-reentrant: with frozen lower layers the reentrant variant silently yields no gradient.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, hf_ds


def router_aux_coef(model) -> float | None:
    """The weight of the router's auxiliary load-balancing loss of a transformers mixture-of-experts
    model (its config has ``output_router_logits`` and ``router_aux_loss_coef``), else None."""
    config = model.config
    if not hasattr(config, "output_router_logits"):
        return None
    return float(getattr(config, "router_aux_loss_coef", 0.0))


def _input_requires_grad(module, args, kwargs):
    def mark(t):
        if torch.is_grad_enabled() and torch.is_tensor(t) and t.is_floating_point() and not t.requires_grad:
            return t.detach().requires_grad_(True)
        return t

    if args:
        return (mark(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": mark(kwargs["hidden_states"])}
    return None


def wrap_model(model, chosen: set[str], ds: dict, weight_decay: float, leaf_layers: bool = True):
    """(engine, counts): freeze all but ``chosen`` and hand only those to DeepSpeed's optimizer.

    ``leaf_layers``: ZeRO-3 fetches a whole decoder layer's parameters in one hook instead of one
    per Linear/norm (DeepSpeed's z3 leaf modules; the layer class is the model's own
    ``_no_split_modules``), which cuts the per-module hook and all-gather launches ~7x. A
    mixture-of-experts model needs it: ranks whose tokens go to different experts would otherwise
    wait on different parameter fetches (setup refuses --no_zero3_leaf_layers for one).
    """
    import deepspeed

    counts = {"trainable": 0, "total": 0}
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        numel = getattr(p, "ds_numel", p.numel())
        counts["total"] += numel
        counts["trainable"] += numel if name in chosen else 0
    if leaf_layers and ds.get("zero_optimization", {}).get("stage") == 3:
        from deepspeed.utils import set_z3_leaf_modules

        names = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if not layers and router_aux_coef(model) is not None:
            raise RuntimeError(
                f"{type(model).__name__} names no decoder layer class in _no_split_modules, so its "
                "mixture-of-experts layers cannot be made ZeRO-3 leaves"
            )
        counts["zero3_leaves"] = sorted({type(m).__name__ for m in layers})
        if layers:
            set_z3_leaf_modules(model, list({type(m) for m in layers}))
            # A leaf layer whose input needs no gradient gets its parameters released by
            # DeepSpeed's backward hook before its own backward ran; the lowest trainable layer
            # is such a layer (everything below is frozen). Its input is made to require grad:
            # autograd still stops there, at the cost of one input gradient.
            lowest = next((m for m in layers if any(p.requires_grad for p in m.parameters())), None)
            if lowest is not None:
                lowest.register_forward_pre_hook(_input_requires_grad, with_kwargs=True)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, chosen, weight_decay), config=ds
    )
    return engine, counts


def build_engine(setup: TrainSetup):
    """(engine, counts) for a run: the model loaded into ZeRO-3 partitions, the trainable set."""
    from deus_dist.checkpoint.layout import disk_names, parameters_holding

    model, hf_ds = load_model(setup.model_dir, setup.ds_config, setup.cfg.activation_checkpointing)
    # setup.trainable names on-disk tensors; transformers may hold several in one parameter
    # (stacked experts), so the parameters that train are those holding them.
    chosen = set(parameters_holding(model, setup.trainable))
    held = {s for sources in disk_names(model).values() for s in sources}
    missing = sorted(set(setup.trainable) - held)
    if missing and not (setup.model_config.get("tie_word_embeddings") and missing == ["lm_head.weight"]):
        raise UserError(f"--trainable: the loaded model has no parameters {missing[:3]}")
    engine, counts = wrap_model(
        model, chosen, setup.ds_config, setup.cfg.weight_decay, setup.cfg.zero3_leaf_layers
    )
    engine.hf_ds_config = hf_ds  # kept with the engine for its lifetime
    return engine, counts
