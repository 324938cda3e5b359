"""The interface every up-scaling method implements, and the registry from name to method.

A method decides the layout of the output (which base layers feed which output layer, through
:mod:`deus_dist.plan`) and computes each new block from its source blocks. Blocks are dicts from
a tensor's suffix inside the block (``mlp.up_proj.weight``) to a float32 tensor; the
architecture description says which space each tensor's rows and columns live in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from deus_dist.architectures import Architecture
from deus_dist.configs import FuseConfig
from deus_dist.errors import UserError
from deus_dist.plan import LayerPlan, insertion_plan

Block = dict[str, torch.Tensor]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise UserError(
            f"--method: unknown method {name!r}; choose one of {', '.join(method_names())}"
        ) from None


class Method(ABC):
    name: ClassVar[str]
    pair: ClassVar[bool] = True
    """New blocks are made from both neighbours (so they can only go in gaps between layers)."""
    default_placement: ClassVar[str] = "top"
    function_preserving: ClassVar[bool] = False
    """The up-scaled model computes exactly what the base computed (checked after writing)."""
    options: ClassVar[tuple[str, ...]] = ()
    """The method's own options (FuseConfig fields it reads beyond the common ones); an option of
    another method given with this one is refused (``unused_options``)."""
    parallel: bool = False
    """Making a block costs more than reading it, so blocks are made by several workers by default
    (``--workers``); for the others one worker keeps up with the IO. A method may decide it in
    ``prepare`` (opt-deus does not with activation features)."""

    def __init__(self) -> None:
        self.reports: dict[str, dict] = {}
        """Per-block diagnostics, keyed "k-(k+1)" by the base layers a block came from; set by
        ``new_block``, moved from a worker to the writer's method with the block."""

    def plan(self, num_layers: int, cfg: FuseConfig) -> LayerPlan:
        """The output layout; the default inserts new blocks into gaps chosen by the placement."""
        return insertion_plan(
            num_layers,
            pair=self.pair,
            placement=cfg.placement or self.default_placement,
            num_new=cfg.num_new,
            positions=cfg.positions,
        )

    def prepare(
        self,
        reader,
        arch: Architecture,
        plan: LayerPlan,
        cfg: FuseConfig,
        block_suffixes: list[str] | None = None,
    ) -> None:
        """Whole-model work before any block is made (calibration, shared fits); default none."""
        return None

    @abstractmethod
    def new_block(
        self, sources: list[Block], layers: tuple[int, ...], arch: Architecture, device: torch.device
    ) -> Block:
        """The new block from its source blocks (one for copy methods, the lower and upper for
        pair methods; ``layers`` are their base indices), as float32 tensors on ``device``."""

    def working_bytes(self, block_bytes: int) -> int:
        """Peak memory of making one block, given a block's float32 size: by default the sources
        and the new block."""
        return 3 * block_bytes

    def block_flops(self) -> float:
        """Arithmetic of making one block, for the time estimate printed before the work (0: the
        method is bound by IO)."""
        return 0.0

    def describe(self) -> dict:
        """Method settings recorded in the manifest beside the layer plan."""
        return {}

    def diagnostics(self) -> dict | None:
        """Measurements recorded in the manifest under ``diagnostics``: by default the per-block
        reports."""
        return dict(sorted(self.reports.items(), key=lambda kv: [int(x) for x in kv[0].split("-")])) or None

    def summary(self) -> list[str]:
        """Lines printed after writing (a diagnostics table, say); default none."""
        return []


def zero_outputs(block: Block, arch: Architecture) -> Block:
    """Zero every tensor that writes into the residual stream: the block becomes an identity map."""
    outputs = arch.output_suffixes()
    return {k: torch.zeros_like(v) if k in outputs else v for k, v in block.items()}


def unused_options(method: Method, cfg: FuseConfig) -> list[str]:
    """Problems for options set away from their defaults that ``method`` does not read: an option
    of another method (``--method avg --ot_solver emd``). Layout options are each plan's own to
    check (solar refuses --placement)."""
    import dataclasses

    owners: dict[str, list[str]] = {}
    for other in _REGISTRY.values():
        for option in other.options:
            owners.setdefault(option, []).append(other.name)
    problems = []
    for f in dataclasses.fields(FuseConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(cfg, f.name) == default:
            continue
        if f.name in owners and f.name not in method.options:
            problems.append(
                f"--{f.name}: --method {method.name} does not use it (an option of {', '.join(sorted(owners[f.name]))})"
            )
    return problems
