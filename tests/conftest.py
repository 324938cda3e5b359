"""Shared fixtures: tiny real transformers models of every supported family, and the embedded SmolLM2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


def tiny_config(family: str, **overrides):
    import transformers as tf

    kw = {**TINY, **overrides}
    if family == "llama":
        return tf.LlamaConfig(**kw)
    if family == "mistral":
        return tf.MistralConfig(**kw)
    if family == "qwen2":
        # sliding windows above layer 2: layer_types mixes full and sliding attention
        return tf.Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=2, **kw)
    if family == "qwen3":
        return tf.Qwen3Config(use_sliding_window=True, sliding_window=16, max_window_layers=3, **kw)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(sliding_window=16, **kw)  # 5 sliding layers, then 1 global
    if family == "gemma2":  # alternating sliding/global layers, both softcaps on
        return tf.Gemma2Config(sliding_window=16, final_logit_softcapping=30.0, **kw)
    if family == "olmo2":
        return tf.Olmo2Config(pad_token_id=0, **kw)
    if family == "phi3":  # fused qkv_proj (GQA) and gate_up_proj, partial rotary
        return tf.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=1, partial_rotary_factor=0.5, **kw)
    if family == "bamba":  # Mamba2 layers 0, 1, 4, 5; attention layers 2, 3 (a pair OT can fuse)
        return tf.BambaConfig(
            attn_layer_indices=[2, 3],
            mamba_n_heads=8,
            mamba_n_groups=2,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_chunk_size=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
            **kw,
        )
    # mixture-of-experts: 4 routed experts, top-2 (the per-expert intermediate differs per family)
    moe = dict(num_experts_per_tok=2, output_router_logits=False)
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, **moe, **kw)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, **moe, **kw)
    if family == "olmoe":  # q_norm/k_norm over the whole q and k projections
        return tf.OlmoeConfig(num_experts=4, eos_token_id=2, **moe, **kw)
    if family == "qwen2_moe":  # a shared expert (dense MLP, sigmoid-gated) beside the routed ones
        return tf.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, **moe, **kw
        )
    kw.pop("head_dim")
    if family == "gpt_neox":  # fused per-head interleaved query_key_value, parallel residual, rotary on 1/4
        kw.pop("num_key_value_heads")
        return tf.GPTNeoXConfig(bos_token_id=1, eos_token_id=1, **kw)
    if family == "gpt2":  # Conv1D weights stored [in, out], learned position embeddings
        kw.pop("num_key_value_heads")
        return tf.GPT2Config(n_inner=kw.pop("intermediate_size"), bos_token_id=1, eos_token_id=1, **kw)
    raise ValueError(family)


FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "gemma2",
    "olmo2",
    "phi3",
    "gpt_neox",
    "gpt2",
]
NEW_FAMILIES = FAMILIES[5:]
"""Families beyond the Llama-shaped five (issue 15): fused, post-norm and GPT-style blocks."""
HYBRID = "bamba"
"""A hybrid of state-space and attention layers: only pairs of one layer type fuse, so the
default placements (which cross types) are tested on their own."""
MOE_FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"]


def make_tiny(
    path: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    dtype=torch.float32,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Save a tiny randomly initialised model (all weights non-trivial) as an HF checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1 and biases at 0: make every tensor distinct
            p.add_(0.05 * torch.randn_like(p))
    model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return path


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny(tmp_path / "base", "llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from deus_dist.embedded import embedded_model_dir

    return embedded_model_dir(progress=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing in the tests may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def fuse(*args: str) -> int:
    """Run tools/fuse_layers.py in-process; returns its exit status."""
    from deus_dist.cli.fuse import main

    return main([str(a) for a in args])


def load_manifest(path: Path) -> dict:
    return json.loads((Path(path) / "deus_manifest.json").read_text())


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from deus_dist.checkpoint import CheckpointReader

    with CheckpointReader(path) as r:
        return {n: r.read(n).clone() for n in r.tensors}


REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_char_tokenizer(path: Path) -> None:
    """A character-level tokenizer (ids < 100) so tiny models can read real text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1}
    vocab.update({chr(c): c - 30 for c in range(32, 127)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def permutation_of_layer(model, src: int, dst: int, seed: int = 0) -> None:
    """Make layer ``dst`` a copy of layer ``src`` with its KV groups, query heads within groups
    and MLP neurons permuted (the same function, units in another order)."""
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    r = H // Hkv
    g = torch.Generator().manual_seed(seed)
    groups = torch.randperm(Hkv, generator=g)
    q_heads = torch.cat([groups[j] * r + torch.randperm(r, generator=g) for j in range(Hkv)])
    neurons = torch.randperm(cfg.intermediate_size, generator=g)

    def rows(t, order, unit):
        return t.reshape(len(order), unit, *t.shape[1:])[order].reshape(t.shape)

    A, B = model.model.layers[src], model.model.layers[dst]
    with torch.no_grad():
        for name, p in A.state_dict().items():
            t = p.clone()
            if name.startswith(("self_attn.q_proj",)):
                t = rows(t, q_heads, hd)
            elif name.startswith(("self_attn.k_proj", "self_attn.v_proj")):
                t = rows(t, groups, hd)
            elif name == "self_attn.o_proj.weight":
                t = rows(t.T, q_heads, hd).T
            elif name.startswith(("mlp.gate_proj", "mlp.up_proj")):
                t = rows(t, neurons, 1)
            elif name == "mlp.down_proj.weight":
                t = rows(t.T, neurons, 1).T
            B.get_parameter(name).copy_(t)


def permutation_of_moe_layer(model, src: int, dst: int, seed: int = 0) -> None:
    """Make MoE layer ``dst`` a copy of layer ``src`` with its KV groups, query heads, routed
    experts (with their router rows), the neurons inside each expert and a shared expert's neurons
    permuted. Works on transformers' in-memory layout: experts stacked as ``experts.gate_up_proj``
    [E, 2I, H] (gate rows, then up rows) and ``experts.down_proj`` [E, H, I]."""
    cfg = model.config
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator().manual_seed(seed + 1)
    permutation_of_layer(model, src, dst, seed)  # attention; everything else copied as it is
    gen = torch.Generator().manual_seed(seed)  # the head orders permutation_of_layer drew
    groups = torch.randperm(Hkv, generator=gen)
    r = H // Hkv
    q_heads = torch.cat([groups[j] * r + torch.randperm(r, generator=gen) for j in range(Hkv)])
    A, B = model.model.layers[src], model.model.layers[dst]
    with torch.no_grad():
        q_norm = getattr(A.self_attn, "q_norm", None)
        if q_norm is not None and q_norm.weight.numel() == H * hd:  # OLMoE: norms over the projection
            B.self_attn.q_norm.weight.copy_(q_norm.weight.reshape(H, hd)[q_heads].reshape(-1))
            k = A.self_attn.k_norm.weight
            B.self_attn.k_norm.weight.copy_(k.reshape(Hkv, hd)[groups].reshape(-1))
        experts = A.mlp.experts
        E, two_i, _ = experts.gate_up_proj.shape
        n = two_i // 2
        order = torch.randperm(E, generator=g)
        for j, e in enumerate(order.tolist()):
            neurons = torch.randperm(n, generator=g)
            gate_up = experts.gate_up_proj[e]
            B.mlp.experts.gate_up_proj[j] = torch.cat([gate_up[:n][neurons], gate_up[n:][neurons]])
            B.mlp.experts.down_proj[j] = experts.down_proj[e][:, neurons]
        B.mlp.gate.weight.copy_(A.mlp.gate.weight[order])
        shared = getattr(A.mlp, "shared_expert", None)
        if shared is not None:
            neurons = torch.randperm(shared.gate_proj.weight.shape[0], generator=g)
            B.mlp.shared_expert.gate_proj.weight.copy_(shared.gate_proj.weight[neurons])
            B.mlp.shared_expert.up_proj.weight.copy_(shared.up_proj.weight[neurons])
            B.mlp.shared_expert.down_proj.weight.copy_(shared.down_proj.weight[:, neurons])


def permute_layer_by_description(model, src: int, dst: int, seed: int = 0) -> None:
    """Make layer ``dst`` a copy of layer ``src`` with a random permutation of every space the
    family's description names (KV groups, query heads within groups, MLP neurons), moved as the
    description says (fused blocks, Conv1D layouts). Whether this is the same function is for the
    caller to check with transformers' forward: that checks the description itself."""
    from deus_dist.architectures import architecture_for
    from deus_dist.ot.align import HeadGeometry, apply_plan, space_units

    config = model.config.to_dict()
    arch = architecture_for(config)
    geo = HeadGeometry.from_config(config, arch)
    layers = model.get_submodule(arch.layer_prefix.rstrip("."))
    block = {k: v.detach().clone() for k, v in layers[src].state_dict().items() if k in arch.block}
    units = space_units(block, arch, geo)
    g = torch.Generator().manual_seed(seed)
    r = geo.group
    groups = torch.randperm(geo.kv_heads, generator=g)
    plans = {
        "mlp": torch.randperm(units["mlp"], generator=g),
        "kv_heads": groups,
        "q_heads": torch.cat([groups[a] * r + torch.randperm(r, generator=g) for a in range(geo.kv_heads)]),
    }
    for space, plan in plans.items():
        apply_plan(block, arch, space, plan, units)
    with torch.no_grad():
        for name, t in block.items():
            layers[dst].get_parameter(name).copy_(t)


def layer_outputs(model, layer, hidden: torch.Tensor) -> torch.Tensor:
    """Output of one decoder layer module of ``model``'s family on ``hidden`` [batch, seq, d]."""
    pos = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
    rotary = model.model.rotary_emb
    with torch.no_grad():
        emb = rotary(hidden, pos)
        out = layer(hidden, attention_mask=None, position_embeddings=emb, position_ids=pos)
    return out[0] if isinstance(out, tuple) else out


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- training ------------------------------------------------------------------------------------


def packed_conversations(folder: Path, lengths: list[int], seq_len: int, seed: int = 0):
    """(conversations, split): random conversations of ``lengths`` tokens (their first 3 tokens
    prompt, never targets) packed end to end into ``seq_len`` rows by the SFT pipeline's RowWriter,
    read back as the loop's Split."""
    import numpy as np

    from deus_dist.train.chat_data import RowWriter
    from deus_dist.train.pipeline import IGNORE, Split

    g = torch.Generator().manual_seed(seed)
    convs = []
    for n in lengths:
        ids = torch.randint(2, 128, (n,), generator=g).tolist()
        convs.append((ids, [IGNORE] * 3 + ids[3:]))
    writer = RowWriter(folder, "packed", seq_len, pad=0, packing=True)
    for ids, labels in convs:
        writer.add(ids, labels)
    rows = writer.close()

    def read(name: str):
        return np.fromfile(folder / f"packed_{name}.bin", dtype=np.int32).reshape(rows, seq_len)

    split = Split(
        ids=read("ids"), labels=read("labels"), positions=read("pos"), counts=np.asarray(writer.counts)
    )
    return convs, split


def alone_losses(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Each target's loss with its conversation alone in a batch (0 where no target)."""
    from deus_dist.train.pipeline import IGNORE

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[0, :-1]
    targets = torch.tensor(labels[1:], device=logits.device)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none", ignore_index=IGNORE)


def batch_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's loss in ``batch`` (its rows end to end), and the model's mean loss."""
    from deus_dist.train.pipeline import IGNORE

    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    logits, labels = out.logits.flatten(0, 1)[:-1].float(), batch["labels"].flatten()[1:]
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE), out.loss


class TwoPackedRows:
    """Five random conversations (23, 17, 30, 12 and 25 tokens) packed into 40-token rows,
    [23, 17], [30] and [12, 25] + 3 of padding; ``batch`` is a micro-batch of rows 0 and 2."""

    IN_BATCH = (0, 1, 3, 4)
    """The conversations in ``batch``."""
    STARTS = (0, 23, 40, 52)
    """Where each of them starts in ``batch``'s rows laid end to end."""

    def __init__(self, folder: Path, seed: int):
        self.convs, self.split = packed_conversations(folder, [23, 17, 30, 12, 25], seq_len=40, seed=seed)
        assert len(self.split) == 3
        self.batch = self.split.batch([0, 2])

    def alone(self, model) -> list[torch.Tensor]:
        """The target losses of each conversation in ``batch``, alone."""
        return [alone_losses(model, *self.convs[i]) for i in self.IN_BATCH]

    def assert_as_alone(self, model, fed: dict, rtol: float = 1e-5, atol: float = 1e-5) -> None:
        """``fed`` (``batch`` as given to the model) gives every target the loss it has alone."""
        losses, _ = batch_losses(model, fed)
        for start, want in zip(self.STARTS, self.alone(model), strict=True):
            torch.testing.assert_close(losses[start : start + len(want)], want, rtol=rtol, atol=atol)


def make_training_model(root: Path, family: str = "llama") -> Path:
    """A tiny character-level base up-scaled 6 -> 9 layers by opt-deus (zero-init new blocks)."""
    base = make_tiny(root / "base", family)
    add_char_tokenizer(base)
    assert fuse("--model", base, "--out", root / "up", "--num_new", "3", "--quiet") == 0
    return root / "up"


def write_wiki_jsonl(path: Path, articles: int = 12, chars: int = 6000) -> Path:
    """Real text (embedded Wikipedia sample) as JSONL records with a ``text`` field."""
    from deus_dist.embedded import wikipedia_split

    with open(path, "w") as f:
        for a in wikipedia_split("train")[:articles]:
            f.write(json.dumps({"text": a["text"][:chars], "title": a["title"]}) + "\n")
    return path


def write_chat_jsonl(path: Path, records: int = 600) -> Path:
    """Real ShareGPT V3 conversations (the embedded subset) as chat messages, cut short for a
    character tokenizer: each answer 40-200 characters, so rows hold different numbers of targets."""
    from deus_dist.embedded import sharegpt_split
    from deus_dist.train.chat_data import to_conversation

    with open(path, "w") as f:
        for i, record in enumerate(sharegpt_split("train")[:records]):
            messages, _ = to_conversation(record, "sharegpt")
            if messages is None:
                continue
            turns = [m for m in messages if m["role"] != "system"][:4]
            keep = 40 + (i * 37) % 160
            turns = [
                {**m, "content": m["content"][: keep if m["role"] == "assistant" else 80]} for m in turns
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def launch_cmd(args, launcher: str = "deepspeed", nproc: int = 2, script: Path | None = None) -> list[str]:
    """The command line that starts ``script`` (launchers/cpt.py) under ``launcher`` with ``nproc`` ranks."""
    import sys

    from deus_dist.ports import free_port

    script = str(script or REPO / "launchers" / "cpt.py")
    port = str(free_port())
    if launcher == "deepspeed":
        head = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            port,
        ]
    elif launcher == "torchrun":
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            port,
            "--master_addr",
            "127.0.0.1",
        ]
    else:
        head = [sys.executable]
    return head + [script] + [str(a) for a in args]


def node_cmds(args, launcher: str, nodes: int = 2, per_node: int = 1) -> list[list[str]]:
    """One launcher command per simulated node (all on loopback), as a multi-node job runs them:
    ``deepspeed --hostfile H --no_ssh --node_rank R`` or ``torchrun --nnodes N --node_rank R``.
    ``args`` is a list, or a function of the node rank giving its list (node-local paths)."""
    import sys
    import tempfile

    from deus_dist.ports import free_port

    port = str(free_port())
    script = str(REPO / "launchers" / "cpt.py")
    cmds = []
    for node in range(nodes):
        node_args = [str(a) for a in (args(node) if callable(args) else args)]
        if launcher == "deepspeed":
            hostfile = Path(tempfile.mkdtemp()) / "hostfile"
            hostfile.write_text("".join(f"node{n} slots={per_node}\n" for n in range(nodes)))
            head = [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
            ]
        else:
            head = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                str(nodes),
                "--node_rank",
                str(node),
                "--nproc_per_node",
                str(per_node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
            ]
        cmds.append(head + [script] + node_args)
    return cmds


def launch_nodes(cmds: list[list[str]], timeout: int = 600) -> list:
    """Start every node's launcher at once and wait for all; returns their CompletedProcess."""
    import subprocess

    procs = [
        subprocess.Popen(c, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    done = []
    try:
        for c, p in zip(cmds, procs, strict=True):
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def launch_env() -> dict:
    # in-process runs of the launchers export their rank layout into this process's environment
    layout = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")
    env = {k: v for k, v in os.environ.items() if k not in layout}
    env.update(
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def launch(
    args, launcher: str = "deepspeed", nproc: int = 2, timeout: int = 600, check: bool = True, script=None
):
    """Run a launcher; every launch also checks that it left no DeepSpeed shared-memory segment in
    /dev/shm (RAM that no process frees)."""
    import subprocess

    shm_before = shm_segments()
    proc = subprocess.run(
        launch_cmd(args, launcher, nproc, script),
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    leaked = shm_segments() - shm_before
    assert not leaked, f"the launch left DeepSpeed shared-memory segments behind: {sorted(leaked)}"
    return proc


def shm_segments() -> set[str]:
    """DeepSpeed's CPU all-reduce segments now in /dev/shm."""
    from deus_dist.train.dist import SHM_DIR

    return {p.name for p in SHM_DIR.glob("deepspeed_allreduce_buffer_*")} if SHM_DIR.is_dir() else set()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


# -- the shared training run (used by the distributed and cluster tests) ---------------------------

TRAIN_COMMON = [
    "--seq_len",
    "64",
    "--micro_batch",
    "2",
    "--lr",
    "3e-3",
    "--warmup_steps",
    "0",
    "--eval_batches",
    "2",
    "--quiet",
]
"""Every test run: 64-token blocks, micro-batch 2 (global batch 8 with --grad_accum 2 on 2 ranks)."""


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory):
    """(root, model, data): a tiny up-scaled model (6 -> 9 layers) and real Wikipedia text."""
    root = tmp_path_factory.mktemp("train")
    model = make_training_model(root)
    data = write_wiki_jsonl(root / "wiki.jsonl")
    return root, model, data


@pytest.fixture(scope="session")
def moe_train_setup(tmp_path_factory):
    """(root, model, data): a tiny Mixtral (4 experts, top-2) up-scaled 6 -> 9 layers, and real text."""
    root = tmp_path_factory.mktemp("train_moe")
    model = make_training_model(root, "mixtral")
    data = write_wiki_jsonl(root / "wiki.jsonl")
    return root, model, data


def train_args(setup, run: str, *extra, cache: str = "cache") -> list:
    root, model, data = setup
    return [
        "--ds_config",
        REPO / "ds_configs" / "zero3_cpu.json",
        "--model",
        model,
        "--data",
        data,
        "--output_dir",
        root / run,
        "--data_cache",
        root / cache,
        *TRAIN_COMMON,
        *extra,
    ]


@pytest.fixture(scope="session")
def uninterrupted(train_setup):
    """6 steps in one go on 2 ranks (global batch 8) under the deepspeed launcher."""
    launch(train_args(train_setup, "full", "--grad_accum", "2", "--max_steps", "6"))
    return train_setup[0] / "full"


def lm_eval_cli(model, tasks: list[str], include_path, limit: int, batch_size: int, out: Path) -> dict:
    """lm-eval's own command line on ``model`` (float32, CPU): its results file, as JSON."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model},dtype=float32",
            "--tasks",
            ",".join(tasks),
            "--include_path",
            str(include_path),
            "--limit",
            str(limit),
            "--device",
            "cpu",
            "--batch_size",
            str(batch_size),
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=launch_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = Path(out).rglob("results_*.json")
    return json.loads(results.read_text())
