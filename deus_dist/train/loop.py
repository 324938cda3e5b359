"""The training loop: read it top to bottom.

Step ``s`` (counted from 1) consumes the global batch at data positions
``[consumed, consumed + G)``, ``G = micro_batch * grad_accum * world_size``; rank ``r``'s
micro-batch ``a`` is the ``micro_batch`` rows starting at ``consumed + (a * world + r) *
micro_batch``. The loss is the mean over the step's target tokens, so the world size and the
accumulation split change nothing but the order of floating-point sums. Everything that changes
is in ``TrainState`` and DeepSpeed's checkpoint, so a run stopped after any step and resumed
computes exactly what an uninterrupted run computes.

A mixture-of-experts model also optimises the router's auxiliary load-balancing loss, as
transformers computes it (``output_router_logits``: ``loss += router_aux_loss_coef * aux_loss``
per micro-batch). metrics.jsonl then has ``aux_loss`` (transformers' unweighted value, mean over
the step's micro-batches and ranks) and keeps ``loss`` the language-model loss alone, comparable
with ``eval_loss`` (which is scored without the auxiliary term) and with dense runs.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deus_dist.configs import TrainConfig, global_batch
from deus_dist.train import checkpointing
from deus_dist.train.checkpointing import TrainState
from deus_dist.train.dist import DistEnv, all_mean, any_rank
from deus_dist.train.metrics import Metrics, format_record, peak_memory_gb
from deus_dist.train.model import model_inputs, router_aux_coef
from deus_dist.train.pipeline import PackedData


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up to ``lr``, then cosine to ``lr * min_lr_ratio`` at ``total`` (step from 1)."""
    warmup = min(cfg.warmup_steps, total // 10)
    if step <= warmup:
        return cfg.lr * step / warmup
    progress = (step - warmup - 1) / max(1, total - warmup - 1)  # the last step is at the floor
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StopRequest:
    """SIGTERM or SIGUSR1 (SLURM's time-limit warning, preemption, scancel) asks for a checkpoint
    and an exit after the current step; ranks agree through an all-reduce, so they stop at the same
    step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class Outcome:
    state: TrainState
    stopped_early: bool
    last_checkpoint: Path | None
    signalled: bool = False
    """A signal stopped the run (not --stop_at_step)."""


def _on(device, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine, data: PackedData, cfg: TrainConfig, env: DistEnv) -> float:
    """Mean held-out loss per target token; every rank scores the same number of rows."""
    per_rank = len(data.eval) // env.world_size
    if cfg.eval_batches:
        per_rank = min(per_rank, cfg.eval_batches * cfg.micro_batch)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    # a mixture-of-experts model scores the language-model loss alone (no router term)
    router = {} if router_aux_coef(engine.module) is None else {"output_router_logits": False}
    for start in range(0, per_rank, cfg.micro_batch):
        rows = [env.rank + env.world_size * i for i in range(start, min(per_rank, start + cfg.micro_batch))]
        # num_items_in_batch=1: the model returns the sum over target tokens, counted exactly
        batch = _on(env.device, model_inputs(engine.module, data.eval.batch(rows)))
        loss = engine(**batch, use_cache=False, num_items_in_batch=1, **router).loss
        total += torch.tensor([loss.item(), data.eval.targets(rows)], dtype=torch.float64, device=env.device)
    engine.train()
    if env.world_size > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def train(
    engine,
    data: PackedData,
    cfg: TrainConfig,
    env: DistEnv,
    state: TrainState,
    run_dir: Path,
    flops_per_token: float | None,
    peak_flops: float | None,
    planned_memory_gb: float | None = None,
) -> Outcome:
    from tqdm import tqdm

    metrics = Metrics(run_dir, env.is_main, state.step)
    ckpt_root = run_dir / "checkpoints"
    per_step = global_batch(cfg.micro_batch, cfg.grad_accum, env.world_size)
    stop = StopRequest()
    bar = tqdm(
        total=state.total_steps,
        initial=state.step,
        desc="train",
        unit="step",
        disable=cfg.quiet or not env.is_main,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    last_ckpt = None
    aux_coef = router_aux_coef(engine.module)
    router = {} if aux_coef is None else {"output_router_logits": True}
    try:
        while state.step < state.total_steps:
            step = state.step + 1
            lr = lr_at(step, cfg, state.total_steps)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            # The loss is the mean over every target token of the global batch (not a mean of
            # per-sequence or per-micro-batch means, which would reweight conversations by length):
            # each micro-batch returns its sum over this share of the step's targets, and
            # DeepSpeed's 1/grad_accum and the mean over ranks make it a mean over all of them.
            share = max(1, data.targets(state.consumed, per_step)) / (cfg.grad_accum * env.world_size)
            losses, aux_losses = [], []
            for micro in range(cfg.grad_accum):
                position = state.consumed + (micro * env.world_size + env.rank) * cfg.micro_batch
                batch = _on(env.device, model_inputs(engine.module, data.batch(position, cfg.micro_batch)))
                out = engine(**batch, use_cache=False, num_items_in_batch=share, **router)
                engine.backward(out.loss)
                engine.step()  # DeepSpeed updates only at the accumulation boundary
                if router:
                    aux_losses.append(out.aux_loss.detach().float())
                    losses.append(out.loss.detach().float() - aux_coef * aux_losses[-1])
                else:
                    losses.append(out.loss.detach())
            loss = all_mean(torch.stack(losses).float().mean().item(), env)  # syncs the device too
            seconds = time.perf_counter() - start
            state.step, state.consumed = step, state.consumed + per_step
            state.tokens += per_step * cfg.seq_len
            grad_norm = engine.get_global_grad_norm()
            aux = {"aux_loss": all_mean(torch.stack(aux_losses).mean().item(), env)} if router else {}
            tokens_per_s = per_step * cfg.seq_len / seconds
            record = {
                "step": step,
                "loss": loss,
                **aux,
                "lr": lr,
                "tokens": state.tokens,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "step_seconds": seconds,
                "tokens_per_s": tokens_per_s,
                "peak_memory_gb": peak_memory_gb(env.device),
            }
            if planned_memory_gb is not None:
                record["planned_memory_gb"] = planned_memory_gb
            if flops_per_token and peak_flops:
                record["mfu"] = tokens_per_s * flops_per_token / (peak_flops * env.world_size)
            finishing = step == state.total_steps
            if finishing or (cfg.eval_every and step % cfg.eval_every == 0):
                record["eval_loss"] = evaluate(engine, data, cfg, env)
                record["eval_ppl"] = math.exp(min(record["eval_loss"], 50.0))
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if env.is_main and (step % cfg.log_every == 0 or finishing or "eval_loss" in record):
                bar.write(format_record(record, state.total_steps), file=sys.stdout)
            # Stop on a signal or at --stop_at_step; all ranks agree on the same step.
            signalled = any_rank(stop.requested, env)
            stopping = signalled or step == cfg.stop_at_step
            if finishing or stopping or (cfg.save_every and step % cfg.save_every == 0):
                last_ckpt = checkpointing.save(engine, env, state, ckpt_root, cfg.keep_checkpoints)
            if stopping and not finishing:
                return Outcome(state, True, last_ckpt, signalled)
    finally:
        stop.restore()
        bar.close()
        metrics.close()
    return Outcome(state, False, last_ckpt)
