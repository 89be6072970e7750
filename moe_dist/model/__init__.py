"""The MoE language model: architecture only, no process groups (see ``moe_dist.parallel``)."""

from .moe import Expert, LocalDispatcher, MoEFeedForward, Routing, flatten_assignments, route
from .transformer import MoE18BLLM, MoETransformer, count_parameters

__all__ = ["Expert", "LocalDispatcher", "MoE18BLLM", "MoEFeedForward", "MoETransformer", "Routing",
           "count_parameters", "flatten_assignments", "route"]
