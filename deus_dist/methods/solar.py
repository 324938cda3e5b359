"""``solar`` (depth up-scaling, arXiv 2312.15166): two copies of the stack, the first without its
top m layers and the second without its bottom m, concatenated into 2(L - m) layers."""

from deus_dist.errors import UserError
from deus_dist.methods.base import Method, register
from deus_dist.plan import solar_plan


@register
class Solar(Method):
    name = "solar"
    pair = False

    def plan(self, num_layers, cfg):
        if cfg.placement is not None or cfg.positions is not None:
            raise UserError(
                "--placement/--positions: solar has its own layout (drop the top m layers of one "
                "copy and the bottom m of another); set its size with --num_new (= L - 2m) instead"
            )
        return solar_plan(num_layers, cfg.num_new)

    def new_block(self, sources, layers, arch, device):
        return dict(sources[0])
