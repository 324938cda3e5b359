"""Reading one decoder block of a checkpoint as float32 tensors keyed by their suffix."""

from __future__ import annotations

import torch

from deus_dist.architectures import Architecture
from deus_dist.checkpoint.reader import CheckpointReader


def read_block(
    reader: CheckpointReader, arch: Architecture, layer: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Every tensor of base layer ``layer`` the checkpoint holds, as float32 on ``device``."""
    names = {s: arch.layer_name(layer, s) for s in arch.block}
    return {s: reader.read(n).to(device, torch.float32) for s, n in names.items() if n in reader}
