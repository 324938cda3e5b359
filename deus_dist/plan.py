"""Layer plans: which base layer (or pair of base layers) feeds each layer of the output model.

A *gap* K is the space between base layers K and K+1. A pair method (one that fuses both
neighbours) can fill gaps 0..L-2; a copy method can also put a block after the last layer (K = L-1),
as LLaMA Pro does. Placements pick gaps the way the OpT-DeUS paper does: ``top`` is the top half's
gaps, so a 32-layer base becomes base 0..15, new(15,16), base 16, ..., base 30, new(30,31), base 31.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deus_dist.errors import UserError

PLACEMENTS = ("top", "bottom", "middle", "top-bottom", "interleaved")


@dataclass(frozen=True)
class LayerSource:
    """Where one output layer comes from."""

    base: tuple[int, ...]
    """Base layer indices: one for an inherited or copied layer, two for a fused pair."""
    new: bool = False

    def to_json(self) -> dict:
        if not self.new:
            return {"base": self.base[0]}
        if len(self.base) == 1:
            return {"copy": self.base[0]}
        return {"pair": list(self.base)}


@dataclass
class LayerPlan:
    num_layers_before: int
    layers: list[LayerSource]
    params: dict = field(default_factory=dict)
    """The fully resolved plan parameters (recorded in the manifest)."""

    @property
    def num_layers_after(self) -> int:
        return len(self.layers)

    @property
    def new_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.layers) if s.new]


def placement_gaps(num_layers: int, placement: str, num_new: int, pair: bool) -> list[int]:
    """The gaps a placement picks; ``num_new`` must already be validated (1..number of gaps)."""
    gaps = num_layers - 1  # K = 0..L-2
    if placement == "top":
        return list(range(gaps - num_new, gaps))
    if placement == "bottom":
        return list(range(num_new))
    if placement == "middle":
        start = (gaps - num_new) // 2
        return list(range(start, start + num_new))
    if placement == "top-bottom":
        low = num_new // 2
        return sorted(set(range(low)) | set(range(gaps - (num_new - low), gaps)))
    if placement == "interleaved":
        # LLaMA Pro: split the stack into num_new groups, a new block after each group's last
        # layer. A pair method has no upper neighbour after the last layer, so it uses gaps only.
        slots = gaps if pair else num_layers
        return [(g + 1) * slots // num_new - 1 for g in range(num_new)]
    raise ValueError(placement)


def insertion_plan(
    num_layers: int,
    *,
    pair: bool,
    placement: str,
    num_new: int | None,
    positions: list[int] | None,
) -> LayerPlan:
    """Base layers in order, with one new block inserted after base layer K for each chosen K."""
    slots = num_layers - 1 if pair else num_layers
    what = "gaps between layers" if pair else "positions (after each layer)"
    problems = []
    if positions is not None:
        bad = [k for k in positions if not 0 <= k < slots]
        if bad:
            problems.append(
                f"--positions: {bad} out of range; the base has {num_layers} layers, so K must be "
                f"in 0..{slots - 1} (K means a new block between layers K and K+1)"
            )
        dup = sorted({k for k in positions if positions.count(k) > 1})
        if dup:
            problems.append(f"--positions: {dup} repeated; each gap takes at most one new block")
        if not positions:
            problems.append("--positions: empty list")
        if num_new is not None and num_new != len(positions):
            problems.append(f"--num_new {num_new} disagrees with the {len(positions)} --positions")
        if problems:
            raise UserError(problems)
        chosen = sorted(positions)
        params = {"positions": chosen}
    else:
        n = num_layers // 2 if num_new is None else num_new
        if n <= 0:
            raise UserError(f"--num_new must be at least 1, got {n}")
        if n > slots:
            raise UserError(
                f"--num_new {n}: a {num_layers}-layer base has only {slots} {what}, one new block each"
            )
        chosen = placement_gaps(num_layers, placement, n, pair)
        params = {"placement": placement, "num_new": n, "positions": chosen}
    layers: list[LayerSource] = []
    for k in range(num_layers):
        layers.append(LayerSource((k,)))
        if k in chosen:
            layers.append(LayerSource((k, k + 1) if pair else (k,), new=True))
    return LayerPlan(num_layers, layers, params)


def solar_plan(num_layers: int, num_new: int | None) -> LayerPlan:
    """SOLAR: two copies of the stack, the first without its top m layers, the second without its
    bottom m: 2(L - m) layers. The second copy's layers m..L-m-1 are the duplicates (the new ones)."""
    if num_new is None:
        m = num_layers // 4
        num_new = num_layers - 2 * m
    elif num_new <= 0:
        raise UserError(f"--num_new must be at least 1, got {num_new}")
    elif num_new > num_layers - 2 or (num_layers - num_new) % 2:
        raise UserError(
            f"--num_new {num_new}: SOLAR duplicates L - 2m layers (m >= 1), so for L={num_layers} "
            f"--num_new must be {'even' if num_layers % 2 == 0 else 'odd'} and at most {num_layers - 2}"
        )
    m = (num_layers - num_new) // 2
    first = [LayerSource((k,)) for k in range(num_layers - m)]
    second = [LayerSource((k,), new=k < num_layers - m) for k in range(m, num_layers)]
    return LayerPlan(num_layers, first + second, {"m": m, "num_new": num_new})
