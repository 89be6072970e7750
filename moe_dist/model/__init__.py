"""The MoE language model: architecture only, no process groups (see ``moe_dist.parallel``).

``build(cfg)`` is the one way to construct it; nothing else names the class to make one.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ModelConfig
from .experts import Expert, GroupedExperts, expert_key, per_expert_fill, select_expert_kernel, stacked_experts
from .moe import LocalDispatcher, MoEFeedForward, Routing, flatten_assignments, route
from .transformer import MoE18BLLM, MoETransformer


def build(cfg: ModelConfig, device: Optional[str | torch.device] = None) -> MoETransformer:
    """The model of ``cfg``, initialised from torch's current RNG; on ``device`` (``"meta"``: shapes
    only, no memory) or torch's default device when None."""
    if device is None:
        return MoETransformer(cfg)
    with torch.device(device):
        return MoETransformer(cfg)


__all__ = ["Expert", "GroupedExperts", "LocalDispatcher", "MoE18BLLM", "MoEFeedForward", "MoETransformer", "Routing",
           "build", "expert_key", "per_expert_fill", "flatten_assignments", "route", "select_expert_kernel", "stacked_experts"]
