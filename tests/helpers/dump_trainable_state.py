"""Launched like launchers/cpt.py (``dump_trainable_state.py OUT.pt CPT_OPTIONS...``): brings the run up
to its first step exactly as the launcher does, a resume included (a checkpoint from another world
size is converted), and writes every trainable parameter's full fp32 master and Adam moments,
gathered from this world size's ZeRO-3 partitions with DeepSpeed's own accessors, to OUT.pt."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from deus_dist.cli.args import parse_config  # noqa: E402
from deus_dist.configs import TrainConfig  # noqa: E402
from deus_dist.train.run import start  # noqa: E402

out = sys.argv[1]
args = [a for a in sys.argv[2:] if not a.startswith("--local_rank")]
run = start(parse_config(TrainConfig, args, "dump", ""), log=lambda *a: None)
state = {"step": run.state.step, "consumed": run.state.consumed, "tensors": {}}
# ZeRO-1/2 link each parameter to its Adam moments only in their first step
# (_lazy_init_hp_params_optimizer_state, deepspeed/runtime/zero/stage_1_and_2.py); link them now
link = getattr(run.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
if link is not None:
    link()
for name, p in run.engine.module.named_parameters():
    if p.requires_grad:
        state["tensors"][name] = {
            "fp32": safe_get_full_fp32_param(p).detach().cpu().clone(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone(),
        }
if run.env.is_main:
    torch.save(state, out)
torch.distributed.barrier()  # every rank has written what it writes
torch.distributed.destroy_process_group()
# Leave without the interpreter's teardown. CI saw ranks of these helpers abort at exit ("terminate
# called without an active exception") twice, never reproduced here: gloo objects that outlive
# destroy_process_group (DeepSpeed keeps its groups) are destroyed there, after a peer may be gone.
# Everything the helper writes is closed by now.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
