"""Layer plans: the paper's placements, LLaMA Pro's interleaving, SOLAR's slicing."""

import pytest

from deus_dist.errors import UserError
from deus_dist.plan import insertion_plan, solar_plan


def test_top_placement_matches_the_paper_for_32_layers():
    plan = insertion_plan(32, pair=True, placement="top", num_new=None, positions=None)
    assert plan.num_layers_after == 48
    assert plan.new_layers[0] == 16  # the lowest new block sits at index 16
    assert [plan.layers[i].base for i in range(15, 19)] == [(15,), (15, 16), (16,), (16, 17)]
    assert plan.layers[-2].base == (30, 31) and plan.layers[-1].base == (31,)
    assert plan.params["positions"] == list(range(15, 31))


def test_top_placement_smollm2_shape():
    plan = insertion_plan(30, pair=True, placement="top", num_new=None, positions=None)
    assert plan.num_layers_after == 45 and len(plan.new_layers) == 15


@pytest.mark.parametrize(
    "placement,expected",
    [("bottom", [0, 1, 2]), ("top", [6, 7, 8]), ("middle", [3, 4, 5]), ("top-bottom", [0, 7, 8])],
)
def test_placements_pick_gaps(placement, expected):
    plan = insertion_plan(10, pair=True, placement=placement, num_new=3, positions=None)
    assert plan.params["positions"] == expected
    for i in plan.new_layers:  # a new block always sits between its two sources
        a, b = plan.layers[i].base
        assert plan.layers[i - 1].base == (a,) and plan.layers[i + 1].base == (b,)


def test_interleaved_is_llama_pro_for_copy_methods():
    plan = insertion_plan(32, pair=False, placement="interleaved", num_new=8, positions=None)
    assert plan.params["positions"] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert plan.layers[-1].base == (31,) and plan.layers[-1].new


def test_interleaved_pair_methods_stay_in_gaps():
    plan = insertion_plan(32, pair=True, placement="interleaved", num_new=8, positions=None)
    assert max(plan.params["positions"]) <= 30 and len(set(plan.params["positions"])) == 8


def test_explicit_positions():
    plan = insertion_plan(6, pair=True, placement="top", num_new=None, positions=[4, 0])
    assert [s.base for s in plan.layers] == [(0,), (0, 1), (1,), (2,), (3,), (4,), (4, 5), (5,)]
    assert plan.new_layers == [1, 6]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_new=0, positions=None), "--num_new must be at least 1"),
        (dict(num_new=6, positions=None), "only 5 gaps"),
        (dict(num_new=None, positions=[5]), "out of range"),
        (dict(num_new=None, positions=[-1]), "out of range"),
        (dict(num_new=None, positions=[1, 1]), "repeated"),
    ],
)
def test_impossible_plans(kwargs, message):
    with pytest.raises(UserError, match=message):
        insertion_plan(6, pair=True, placement="top", **kwargs)


def test_solar_slicing():
    plan = solar_plan(32, None)
    assert plan.num_layers_after == 48 and plan.params["m"] == 8
    assert [s.base[0] for s in plan.layers] == list(range(24)) + list(range(8, 32))
    assert [plan.layers[i].base[0] for i in plan.new_layers] == list(range(8, 24))
    with pytest.raises(UserError, match="--num_new"):
        solar_plan(32, 15)
