"""GPU paths (skipped without CUDA): the same results on the device as on the CPU."""

import pytest
import torch

from conftest import TwoPackedRows, fuse, make_tiny, state_dict
from deus_dist.ot.solvers import pairwise_sq_dist, transport_plan

pytestmark = pytest.mark.gpu


def test_sinkhorn_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 64, generator=g)
    cost = pairwise_sq_dist(a, a[torch.randperm(512, generator=g)])
    cpu, _ = transport_plan(cost, "sinkhorn", reg=0.005)
    gpu, _ = transport_plan(cost.cuda(), "sinkhorn", reg=0.005)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_auction_on_cuda_finds_what_it_finds_on_cpu():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, 512, generator=g)
    perm = torch.randperm(4096, generator=g)
    planted = pairwise_sq_dist(a, a[perm] + 0.05 * torch.randn(4096, 512, generator=g))
    plan, info = transport_plan(planted.cuda(), "auction")
    assert plan.is_cuda and torch.equal(perm[plan.cpu()], torch.arange(4096))
    crowded = pairwise_sq_dist(a, torch.randn(4096, 512, generator=g))
    _, cpu = transport_plan(crowded, "auction")
    _, gpu = transport_plan(crowded.cuda(), "auction")
    assert gpu.certified >= 0.998 and cpu.certified >= 0.998


@pytest.mark.parametrize("solver", ["auction", "exact", "sinkhorn"])
def test_fuse_on_cuda_matches_cpu(tmp_path, solver):
    base = make_tiny(tmp_path / "base", "llama")
    for device in ("cpu", "cuda"):
        assert (
            fuse(
                "--model",
                base,
                "--out",
                tmp_path / device,
                "--device",
                device,
                "--ot_solver",
                solver,
                "--ot_reg",
                "0.005",
                "--quiet",
            )
            == 0
        )
    a, b = state_dict(tmp_path / "cpu"), state_dict(tmp_path / "cuda")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)


def test_packed_micro_batch_under_flash_attention_keeps_conversations_apart(tmp_path):
    """What the launcher feeds FlashAttention 2 for a packed micro-batch of 2 rows
    (``model_inputs``: one row of all its tokens) gives every token, in bf16, the loss it has with
    its conversation alone (tests/test_sft.py checks the same on CPU with reference kernels)."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    from transformers import AutoModelForCausalLM

    from deus_dist.train.model import model_inputs

    model = (
        AutoModelForCausalLM.from_pretrained(
            make_tiny(tmp_path / "m"), attn_implementation="flash_attention_2", dtype=torch.bfloat16
        )
        .cuda()
        .eval()
    )
    packed = TwoPackedRows(tmp_path, seed=1)
    packed.assert_as_alone(model, model_inputs(model, packed.batch), rtol=0.02, atol=0.05)


def test_packed_micro_batch_of_a_hybrid_keeps_conversations_apart_with_the_mamba_kernels(tmp_path):
    """A hybrid's Mamba layers restart their state at every packed conversation when the kernels
    get ``seq_idx`` from ``model_inputs`` (tests/test_sft.py emulates the kernels on CPU)."""
    from deus_dist.train.model import missing_packed_sequence_kernels, model_inputs

    if missing_packed_sequence_kernels():
        pytest.skip(f"not installed: {', '.join(missing_packed_sequence_kernels())}")
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(
            make_tiny(tmp_path / "m", "bamba"), attn_implementation="sdpa", dtype=torch.bfloat16
        )
        .cuda()
        .eval()
    )
    packed = TwoPackedRows(tmp_path, seed=2)
    packed.assert_as_alone(model, model_inputs(model, packed.batch), rtol=0.02, atol=0.05)
