"""Up-scaling methods: one module per method, each registering itself under its name."""

from deus_dist.methods import avg, copy, lesa, llama_pro, opt_deus, solar  # noqa: F401  (registration)
from deus_dist.methods.base import Block, Method, get_method, method_names, register, unused_options

__all__ = ["Block", "Method", "get_method", "method_names", "register", "unused_options"]
