"""Launched with torchrun (``measure_memory.py OUT.json SPEC.json``): for each case of the spec (a
sharding and a precision), builds the real engine (load_model/wrap_model, as training does) for
a small random Llama, runs one step and writes what each rank holds, by the memory planner's parts:

- frozen / trainable weights: DeepSpeed's partitions (ZeRO-3 ``ds_tensor``), else the parameters;
- gradients: the engine's gradient buffers after backward (ZeRO-3's flat partition buffer and fp32
  step buffer, ZeRO-2's partition, ZeRO-1's full ``.grad``), storage by storage;
- optimizer state: fp32 masters and the inner optimizer's moments after the step;
- activations: the bytes autograd still holds at the end of forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded, storages counted once);
- communication: reduce buckets, and ZeRO-3's largest set of gathered parameters during forward.

ZeRO-1/2 cases must come before ZeRO-3 ones: ZeRO-3's loader replaces ``F.linear`` for the rest of
the process (deepspeed/runtime/zero/linear.py), as it does in a real ZeRO-3 run.
"""

import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from saved_activations import SavedActivations  # noqa: E402  (beside this script)

from deus_dist.train.dist import init_distributed  # noqa: E402
from deus_dist.train.ds_config import load_ds_config, resolve_ds_config  # noqa: E402
from deus_dist.train.model import load_model, wrap_model  # noqa: E402


def storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            st = t.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


def tensors_in(obj, depth=0):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)) and depth < 3:
        for x in obj:
            yield from tensors_in(x, depth + 1)
    elif isinstance(obj, dict) and depth < 3:
        for x in obj.values():
            yield from tensors_in(x, depth + 1)


def ds_config(case: dict, repo: str) -> dict:
    """The shipped config of the case (zero1.json, zero2.json, zero3_cpu.json; offload as
    zero3_offload.json sets it, with torch's AdamW on the host)."""
    name = {1: "zero1.json", 2: "zero2.json", 3: "zero3_cpu.json"}[case["stage"]]
    raw = load_ds_config(os.path.join(repo, "ds_configs", name))
    zero = raw["zero_optimization"]
    if case.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
        zero["offload_param"] = {"device": "cpu"}
        raw["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the host (no CPU Adam build)
    raw["zero_optimization"] = zero
    return raw


def measure(case, spec, env, repo) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(**spec["config"])
    accum = case.get("grad_accum", 1)
    ds = resolve_ds_config(
        ds_config(case, repo),
        micro_batch=spec["micro_batch"],
        grad_accum=accum,
        world_size=env.world_size,
        lr=1e-3,
        betas=[0.9, 0.95],
        weight_decay=0.0,
        grad_clip=1.0,
        hidden_size=config.hidden_size,
        cuda=False,
        precision=case["precision"],
    )
    model, hf_ds = load_model(
        config, ds, activation_checkpointing=case.get("activation_checkpointing", False)
    )
    new = {f"model.layers.{i}." for i in spec["new_layers"]}
    chosen = {n for n, _ in model.named_parameters() if any(n.startswith(p) for p in new)}
    engine, _ = wrap_model(model, chosen, ds, 0.0, leaf_layers=True)
    engine.hf_ds_config = hf_ds
    engine.train()  # as the training loop does (activation checkpointing runs only in training mode)
    opt = engine.optimizer
    stage = case["stage"]
    params = list(engine.module.parameters())

    def held(p):  # this rank's copy of a parameter
        return p.ds_tensor if stage == 3 else p

    frozen = sum(storages(held(p) for p in params if not p.requires_grad).values())
    if stage == 3:
        trainable = storages([getattr(opt, "lp_param_buffer", None)] or [])
        if not trainable:
            trainable = storages(p.ds_tensor for p in params if p.requires_grad)
    else:
        trainable = storages(opt.bit16_groups_flat)
    # gathered parameters during forward (ZeRO-3): the largest set whole at once
    gathered = {"now": 0, "max": 0}

    def live_bytes():
        return sum(
            p.numel() * p.element_size() for p in params if p.data.numel() == getattr(p, "ds_numel", -1)
        )

    def watch(*_):
        gathered["max"] = max(gathered["max"], live_bytes())

    hooks = []
    if stage == 3:
        for m in engine.module.modules():
            hooks.append(m.register_forward_hook(watch))
            hooks.append(m.register_forward_pre_hook(watch))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (spec["micro_batch"], spec["seq_len"]), generator=g)

    buckets: dict[int, int] = {}
    if stage < 3:  # ZeRO-1/2 allocate their buckets in backward and free them after it
        reduce = opt.reduce_ipg_grads

        def reduce_and_record(*a, **k):
            buckets.update(storages(t for b in opt.ipg_buckets.values() for t in tensors_in(b.buffer)))
            return reduce(*a, **k)

        opt.reduce_ipg_grads = reduce_and_record
    with SavedActivations(params) as saved:
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
    for h in hooks:
        h.remove()
    activations = saved.held()
    engine.backward(loss)
    grad_tensors = [p.grad for p in params if p.requires_grad and p.grad is not None]
    for name in ("grad_partitions_flat_buffer", "grads_in_partition", "averaged_gradients"):
        grad_tensors += list(tensors_in(getattr(opt, name, None)))
    for group in getattr(opt, "fp32_partitioned_groups_flat", []):
        grad_tensors += [group.grad] if group.grad is not None else []
    gradients = storages(grad_tensors)
    buckets.update(
        storages(t for b in getattr(opt, "ipg_buckets", {}).values() for t in tensors_in(b.buffer))
    )
    engine.step()
    for _ in range(accum - 1):  # the rest of the optimizer step's micro-batches
        engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
        engine.step()
    masters = storages(
        getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
    )
    inner = opt.optimizer
    moments = storages(t for st in inner.state.values() for k, t in st.items() if k != "step")
    optimizer_state = {k: v for k, v in {**masters, **moments}.items() if k not in trainable}
    result = {
        "name": case["name"],
        "precision": case["precision"],
        "activation_checkpointing": case.get("activation_checkpointing", False),
        "grad_accum": accum,
        "frozen_weights": frozen,
        "trainable_weights": sum(trainable.values()),
        "gradients": sum(v for k, v in gradients.items() if k not in trainable),
        "optimizer_state": sum(optimizer_state.values()),
        "activations": activations,
        "communication": sum(buckets.values()) + gathered["max"],
    }
    engine.destroy()
    del engine, model, inner, loss
    gc.collect()
    return result


def main() -> None:
    out, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(open(spec_path).read())
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = init_distributed()
    results = [measure(case, spec, env, repo) for case in spec["cases"]]
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, results)
    if env.is_main:
        with open(out, "w") as f:
            json.dump(gathered, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Leave without the interpreter's teardown. CI saw ranks of these helpers abort at exit ("terminate
    # called without an active exception") twice, never reproduced here: gloo objects that outlive
    # destroy_process_group (DeepSpeed keeps its groups) are destroyed there, after a peer may be gone.
    # Everything the helper writes is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
