"""The memory planner (tools/plan_memory.py): its figures against what a real 2-rank engine holds,
its recommendation, the placements table, and its errors for impossible layouts."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers.saved_activations import SavedActivations

from conftest import FAMILIES, HYBRID, MOE_FAMILIES, REPO, launch_cmd, launch_env
from deus_dist.cli.plan_memory import PlanMemoryConfig, build, main
from deus_dist.train.memory_plan import GiB, RunShape, plan_choice, shape_from_config, shardings

SPEC = {
    # a small Llama up-scaled 6 -> 9 layers, the top three new (as the fuse tool's top placement)
    "config": {
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 9,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "tie_word_embeddings": True,
        "max_position_embeddings": 256,
    },
    "new_layers": [6, 7, 8],
    "seq_len": 64,
    "micro_batch": 2,
    # ZeRO-1/2 first: ZeRO-3's loader replaces F.linear for the rest of the process
    "cases": [
        {"name": "zero1", "stage": 1, "precision": "fp32"},
        {"name": "zero1", "stage": 1, "precision": "bf16", "grad_accum": 2},  # full gradients kept
        {"name": "zero2", "stage": 2, "precision": "fp32"},
        {"name": "zero2", "stage": 2, "precision": "bf16"},
        {"name": "zero2", "stage": 2, "precision": "fp32", "activation_checkpointing": True},
        {"name": "zero3", "stage": 3, "precision": "fp32"},
        {"name": "zero3", "stage": 3, "precision": "bf16"},
        {"name": "zero3", "stage": 3, "precision": "bf16", "activation_checkpointing": True},
        {"name": "zero3-offload", "stage": 3, "offload": True, "precision": "fp32"},
    ],
}
PARTS = (
    "frozen_weights",
    "trainable_weights",
    "gradients",
    "optimizer_state",
    "activations",
    "communication",
)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One 2-rank launch that builds the engine for every case and reports what each rank holds."""
    root = tmp_path_factory.mktemp("memory")
    spec, out = root / "spec.json", root / "held.json"
    spec.write_text(json.dumps(SPEC))
    script = REPO / "tests" / "helpers" / "measure_memory.py"
    cmd = launch_cmd([out, spec], "torchrun", 2, script=script)
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    # the head too: a rank's own words come before torchrun's summary of who failed
    assert proc.returncode == 0, (
        f"wrote {out.name}: {out.is_file()}\n" + proc.stderr[:3000] + proc.stderr[-2000:]
    )
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    return ranks


@pytest.mark.distributed
@pytest.mark.parametrize(
    "index",
    range(len(SPEC["cases"])),
    ids=lambda i: "-".join(
        str(v)
        for k, v in SPEC["cases"][i].items()
        if k in ("name", "precision", "activation_checkpointing", "grad_accum")
    ),
)
def test_plan_within_10_percent_of_what_the_engine_holds(measured, index):
    case = SPEC["cases"][index]
    shape = shape_from_config({"model_type": "llama", **SPEC["config"]}, SPEC["new_layers"])
    run = RunShape(
        gpus_per_node=2,
        seq_len=SPEC["seq_len"],
        micro_batch=SPEC["micro_batch"],
        precision=case["precision"],
        activation_checkpointing=case.get("activation_checkpointing", False),
        grad_accum=case.get("grad_accum", 1),
    )
    sharding = next(s for s in shardings(cuda=False) if s.name == case["name"])
    plan = plan_choice(shape, run, sharding)
    for part in PARTS:
        held = max(rank[index][part] for rank in measured)  # the rank that holds most
        planned = plan.parts[part] + plan.host.get(part, 0)
        assert held > 0, (case, part)
        assert planned == pytest.approx(held, rel=0.10), (case, part, planned, held)
    # offload moves every partition and the optimizer to the host
    assert bool(plan.host) == bool(case.get("offload"))


def plan_json(capsys, *args) -> dict:
    assert main([*map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_every_choice_and_part(capsys):
    report = plan_json(capsys, "--base", "llama-3.1-8b", "--placement", "top")
    names = [c["name"] for c in report["choices"]]
    assert names == ["zero1", "zero2", "zero3", "zero3-offload"]
    for c in report["choices"]:
        assert set(c["parts"]) == set(PARTS) | {"working"}
        assert (
            c["total"]
            == c["peak"]
            >= sum(v for k, v in c["parts"].items() if k not in ("activations", "working"))
        )
    by = {c["name"]: c for c in report["choices"]}
    # frozen weights replicated under ZeRO-1/2, split 8 ways under ZeRO-3
    assert by["zero2"]["parts"]["frozen_weights"] == pytest.approx(
        8 * by["zero3"]["parts"]["frozen_weights"], rel=0.01
    )
    # Adam state only for the 16 new layers: 12 bytes per trainable parameter, over 8 GPUs
    trainable = report["shape"]["trainable_params"]
    assert by["zero3"]["parts"]["optimizer_state"] == pytest.approx(12 * trainable / 8, rel=0.01)
    assert report["shape"]["new_layers"] == list(range(16, 48, 2))
    assert report["recommended"] in names


def test_placements_change_activations_not_weights(capsys):
    report = plan_json(capsys, "--base", "llama-3.2-1b", "--gpus_per_node", "1", "--gpu_memory", "141")
    rows = report["placements"]
    assert set(rows) == {"top", "interleaved", "bottom"}
    acts = {p: next(c for c in r["choices"] if c["name"] == "zero2")["parts"] for p, r in rows.items()}
    # 23 layers of saved tensors against 8 (the fp32 log-softmax over 128k tokens is common to both)
    assert acts["bottom"]["activations"] > 1.2 * acts["top"]["activations"]
    assert acts["bottom"]["optimizer_state"] == acts["top"]["optimizer_state"]
    assert rows["top"]["shape"]["lowest_trainable"] == 8 and rows["bottom"]["shape"]["lowest_trainable"] == 1


def test_recommends_the_fastest_that_fits_and_prints_the_command(capsys):
    assert (
        main(["--base", "llama-3.2-1b", "--placement", "top", "--gpus_per_node", "1", "--gpu_memory", "141"])
        == 0
    )
    out = capsys.readouterr().out
    assert "zero1 is the fastest choice that fits" in out
    assert "run it: deepspeed --num_gpus 1 launchers/cpt.py" in out
    assert "placements side by side" in out


def test_nothing_fits_says_what_would():
    plan, _ = build(
        PlanMemoryConfig(base="llama-3.1-70b", placement="bottom", gpu_memory=80, compare_placements=False)
    )
    assert plan.recommended is None
    text = "\n".join(plan.reasons)
    assert "nothing fits" in text and "GiB more than" in text
    assert "--activation_checkpointing" in text or "--nodes" in text


def test_checkpointing_shrinks_activations():
    shape = shape_from_config({"model_type": "llama", **SPEC["config"]}, SPEC["new_layers"])
    z3 = next(s for s in shardings() if s.name == "zero3")
    off = plan_choice(shape, RunShape(seq_len=512, micro_batch=4), z3).parts["activations"]
    on = plan_choice(shape, RunShape(seq_len=512, micro_batch=4, activation_checkpointing=True), z3).parts[
        "activations"
    ]
    assert on < off / 2


def test_model_dir_reads_its_manifest(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **SPEC["config"]}))
    (tmp_path / "deus_manifest.json").write_text(json.dumps({"new_layers": [1, 3]}))
    report = plan_json(capsys, "--model", tmp_path, "--gpus_per_node", "2")
    assert report["shape"]["new_layers"] == [1, 3] and report["shape"]["lowest_trainable"] == 1
    assert "placements" not in report
    assert report["choices"][0]["peak"] < 1 * GiB


@pytest.mark.parametrize(
    "args, option",
    [
        (
            ["--base", "llama-3.1-8b", "--gpus_per_node", "8", "--nodes", "2", "--global_batch", "32"],
            "--global_batch",
        ),
        (["--base", "llama-3.1-8b", "--num_new", "0"], "--num_new"),
        (["--base", "llama-3.1-8b", "--num_new", "40"], "--num_new"),
        (["--base", "no-such-shape"], "--base"),
        (["--gpus_per_node", "2"], "--model"),
        (["--base", "small", "--headroom", "1.5"], "--headroom"),
        (["--base", "small", "--micro_batch", "0"], "--micro_batch"),
    ],
)
def test_bad_input_names_the_option(args, option, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("plan_memory.py: error:") and option in err, err


def test_model_option_refuses_layout_options_and_an_empty_manifest(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **SPEC["config"]}))
    (tmp_path / "deus_manifest.json").write_text(json.dumps({"new_layers": []}))
    assert main(["--model", str(tmp_path), "--placement", "top"]) == 2
    assert "--placement" in capsys.readouterr().err
    assert main(["--model", str(tmp_path)]) == 2
    assert "lists no new layers" in capsys.readouterr().err


def auto(config: dict, memory: float, cuda: bool, world: int = 8, **kw):
    from deus_dist.train.memory_plan import auto_ds_config

    shape = shape_from_config(config, [])
    names = {f"model.layers.{i}.mlp.down_proj.weight" for i in range(shape.num_layers // 2, shape.num_layers)}
    run = (
        dict(seq_len=2048, micro_batch=4, grad_accum=8, precision="bf16", activation_checkpointing=True) | kw
    )
    return auto_ds_config(config, names, RunShape(gpus_per_node=world, **run), cuda=cuda, memory_gib=memory)


def test_auto_keeps_zero3_when_the_frozen_weights_do_not_fit_one_gpu():
    from deus_dist.train.memory_plan import BASE_SHAPES

    big = {"model_type": "llama", **BASE_SHAPES["llama-3.1-70b"]}
    path, why = auto(big, memory=80, cuda=True)
    assert path.name == "zero3.json" and "zero3" in why and "GiB" in why
    small = {"model_type": "llama", **BASE_SHAPES["llama-3.2-1b"]}
    path, why = auto(small, memory=80, cuda=True)
    assert path.name == "zero1.json", why
    path, _ = auto(small, memory=80, cuda=False, world=2, seq_len=256, micro_batch=1)
    assert path.name == "zero1.json" and path.is_file()


def test_auto_names_the_shortfall_when_nothing_fits():
    from deus_dist.errors import UserError
    from deus_dist.train.memory_plan import BASE_SHAPES

    with pytest.raises(UserError, match=r"--ds_config auto: no shipped config fits 8.0 GiB .* GiB more than"):
        auto({"model_type": "llama", **BASE_SHAPES["llama-3.1-70b"]}, memory=8, cuda=True)


def test_auto_shortfall_for_an_unchecked_family_keeps_its_advice_and_adds_the_caveat():
    """The caveat a plan appends to its reasons is not advice: with none to give, the error still
    says what to change, and names the unchecked activations after it."""
    from conftest import tiny_config
    from deus_dist.errors import UserError
    from deus_dist.train.memory_plan import auto_ds_config

    gpt2 = {"model_type": "gpt2", **tiny_config("gpt2").to_dict()}
    run = RunShape(gpus_per_node=1, seq_len=16, micro_batch=1, activation_checkpointing=True)
    with pytest.raises(UserError) as err:
        auto_ds_config(gpt2, set(), run, cuda=True, memory_gib=1e-6)
    message = str(err.value)
    assert "use more GPUs, --activation_checkpointing or a smaller --micro_batch" in message
    assert message.endswith("beside planned_memory_gb") and "gpt2 blocks save other tensors" in message


@pytest.mark.distributed
def test_cpt_with_ds_config_auto_picks_a_cpu_config_and_trains(train_setup):
    from conftest import launch, read_metrics, train_args

    proc = launch(
        train_args(train_setup, "auto", "--ds_config", "auto", "--grad_accum", "2", "--max_steps", "2")
    )
    assert "--ds_config auto: ds_configs/zero1.json (zero1), the fastest that fits" in proc.stdout, (
        proc.stdout
    )
    records = read_metrics(train_setup[0] / "auto")
    assert [r["step"] for r in records] == [1, 2]
    # the run records the planner's figure for itself as launched: 2 ranks, the manifest's new
    # layers training, micro-batch 2 x 64 tokens, 2 accumulation steps, fp32, zero1.json's buffers
    model = train_setup[1]
    config = json.loads((model / "config.json").read_text())
    new = json.loads((model / "deus_manifest.json").read_text())["new_layers"]
    run = RunShape(gpus_per_node=2, seq_len=64, micro_batch=2, grad_accum=2, precision="fp32")
    zero1 = next(sh for sh in shardings(cuda=False) if sh.name == "zero1")
    expected = plan_choice(shape_from_config(config, new), run, zero1).peak / 1e9
    assert [r["planned_memory_gb"] for r in records] == pytest.approx([expected, expected])
    assert "memory plan (zero1): " in proc.stdout


def test_shape_from_config_inside_a_live_zero3_context():
    """A training run plans its memory while transformers holds its ZeRO-3 config (which would make
    from_config partition the model with collectives): the meta model is built outside it."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    config = {"model_type": "llama", **SPEC["config"]}
    outside = shape_from_config(config, SPEC["new_layers"])
    live = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        inside = shape_from_config(config, SPEC["new_layers"])
        assert is_deepspeed_zero3_enabled()  # the run's context is back
    finally:
        unset_hf_deepspeed_config()
    del live
    assert inside == outside


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES + [HYBRID])
def test_every_family_is_sized(family):
    """Every training run plans its memory, so the planner reads every family's config (GPT-2 names
    its MLP width n_inner) and counts exactly the model's parameters, split by what trains."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config)
    layers = model.get_decoder().layers if hasattr(model.get_decoder(), "layers") else model.get_decoder().h
    shape = shape_from_config(config.to_dict(), [1])
    assert shape.total == sum(p.numel() for p in model.parameters())
    assert shape.trainable == sum(p.numel() for p in layers[1].parameters())
    assert shape.intermediate > shape.hidden > 0
    run = RunShape(gpus_per_node=2, seq_len=64, micro_batch=2)
    assert all(plan_choice(shape, run, sh).peak > 0 for sh in shardings(cuda=False))


@pytest.mark.parametrize("zero3", [False, True], ids=["zero12", "zero3"])
@pytest.mark.parametrize("placement", ["top", "interleaved"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES + [HYBRID])
def test_activation_estimate_is_checked_or_the_plan_says_it_is_not(
    family, precision, placement, zero3, monkeypatch
):
    """Saved activations of the model as training loads it (its attention; the top half of its
    layers trainable, or every other one, frozen layers between; under ZeRO-3, with DeepSpeed's
    own linear, which a ZeRO-3 load puts in place of F.linear), against the planner's per-token
    terms: within 10% for the families those terms describe; every other family's plan says its
    activations are an unchecked estimate."""
    import torch

    if zero3:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)

    from conftest import tiny_config
    from deus_dist.architectures import architecture_for
    from deus_dist.train.memory_plan import activation_bytes, make_plan
    from deus_dist.train.model import load_model

    config = tiny_config(family)
    model, _ = load_model(
        config, {"bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": False}}, False
    )
    model.train()
    description = {"model_type": config.model_type, **config.to_dict()}
    arch = architecture_for(description)
    n = config.num_hidden_layers
    new = list(range(n // 2, n)) if placement == "top" else list(range(1, n, 2))
    for name, p in model.named_parameters():
        split = arch.split_name(name)
        p.requires_grad_(split is not None and split[0] in new)
    seq, micro = 8, 2  # shorter than the tiny configs' 16-token windows: no attention mask
    ids = torch.randint(0, config.vocab_size, (micro, seq), generator=torch.Generator().manual_seed(0))
    with SavedActivations(model.parameters()) as saved:
        loss = model(input_ids=ids, labels=ids).loss
    held = saved.held()
    del loss
    shape = shape_from_config(description, new)
    # no engine here, so no ZeRO-3 leaf hook making the lowest layer's input require grad
    run = RunShape(
        gpus_per_node=1, seq_len=seq, micro_batch=micro, precision=precision, zero3_leaf_layers=False
    )
    planned = activation_bytes(shape, run, zero3=zero3)["saved"]
    plan = make_plan(shape, run, gpu_memory_gib=80)
    caveats = [r for r in plan.reasons if "not checked against measurement" in r]
    if shape.activations_checked(seq):
        assert planned == pytest.approx(held, rel=0.10), (family, planned, held)
        assert not caveats
    else:
        assert len(caveats) == 1 and config.model_type in caveats[0], plan.reasons


def test_unchecked_activations_are_named_in_the_plan_and_the_json(tmp_path, capsys):
    from conftest import tiny_config

    mistral = {"model_type": "mistral", **tiny_config("mistral", sliding_window=16).to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    (tmp_path / "deus_manifest.json").write_text(json.dumps({"new_layers": [4, 5]}))
    assert main(["--model", str(tmp_path), "--gpus_per_node", "1", "--seq_len", "64"]) == 0
    assert "16-token attention window is not longer than --seq_len 64" in capsys.readouterr().out
    report = plan_json(capsys, "--model", tmp_path, "--gpus_per_node", "1", "--seq_len", "15")
    assert not any("not checked" in r for r in report["reasons"])  # the window covers 15 tokens
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", **tiny_config("gpt2").to_dict()}))
    (gpt2 / "deus_manifest.json").write_text(json.dumps({"new_layers": [5]}))
    report = plan_json(capsys, "--model", gpt2, "--gpus_per_node", "1")
    assert any("gpt2 blocks save other tensors" in r for r in report["reasons"])
