"""``llama-pro`` (block expansion, arXiv 2401.02415): after every L/N base layers, a copy of the
layer just below with its residual-stream outputs (o_proj, down_proj) zeroed, so each new block is
an identity map and the up-scaled model computes exactly what the base did."""

from deus_dist.methods.base import Method, register, zero_outputs


@register
class LlamaPro(Method):
    name = "llama-pro"
    pair = False
    default_placement = "interleaved"
    function_preserving = True

    def new_block(self, sources, layers, arch, device):
        return zero_outputs(sources[0], arch)
