"""``avg`` (Avg-DeUS): the plain average of the two neighbours, no alignment, no zeroing.

Neurons of two independently trained layers are not in corresponding order, so this mixes
unrelated units; it is the baseline that OT alignment is compared with.
"""

from deus_dist.methods.base import Method, register


@register
class Average(Method):
    name = "avg"
    pair = True

    def new_block(self, sources, layers, arch, device):
        lower, upper = sources
        return {k: 0.5 * (lower[k] + upper[k]) for k in lower}
