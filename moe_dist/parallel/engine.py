"""The engine seam: what the trainer and the checkpoint ask of a training engine.

An engine owns the sharded parameters, the optimizer and gradient reduction. The trainer drives it
(forward, backward, step), and the checkpoint reads and writes its state as runs of flattened
parameters (:class:`~moe_dist.checkpoint.fragment.Fragment`), never learning which engine it is.

DeepSpeed ZeRO lives behind this protocol in ``parallel/deepspeed/``. A second engine is a new
folder beside it (``parallel/<engine>/``: set-up, expert-group marking, runs of its shards)
implementing :class:`Engine`, plus one branch in ``parallel/runtime.py: build_engine``.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch import nn

from ..checkpoint.fragment import Fragment, split_rows


class Engine(Protocol):
    module: nn.Module  # the model, as the engine holds it (experts sharded, weights possibly partitioned)
    device: torch.device  # where inputs go

    def __call__(self, tokens_BT: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Forward: (logits [B, T, V], aux loss or None)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """Called after every micro-batch's backward; the engine steps the optimizer at the
        accumulation boundary and only accumulates before it."""

    def grad_norm(self) -> Optional[float]:
        """The global gradient norm of the last optimizer step (before clipping), or None."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (the LR schedule writes ``lr`` into them)."""

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole reduced gradient, between the last backward and ``step``
        (collective; for debugging and the GPU check)."""

    def train(self) -> None: ...

    def eval(self) -> None: ...

    # ---- checkpoint hooks (see moe_dist.checkpoint.dcp_state)
    def checkpoint_fragments(self) -> list[Fragment]:
        """This rank's runs of every trainable parameter: fp32 masters and optimizer states, as live views."""

    def has_optimizer_state(self) -> bool:
        """True once the optimizer holds state for every parameter (after the first step)."""

    def materialize_optimizer_state(self) -> bool:
        """Create the zero state a fresh optimizer lacks, as its first step would; local, no collective."""

    def sync_weights_from_masters(self) -> None:
        """Make the weights the model computes with equal the fp32 masters after a load (collective)."""


def _expert_rows(module: nn.Module) -> dict[str, list[str]]:
    """{stacked expert matrix name: the per-expert name of each of its rows} of ``module``."""
    from ..model import expert_key, stacked_experts

    return {name: [expert_key(name, first + j) for j in range(k)]
            for name, (first, k) in stacked_experts(module).items()}


def per_expert_fragments(module: nn.Module, fragments: list[Fragment]) -> list[Fragment]:
    """An engine's fragments as the checkpoint names parameters: stacked expert matrices cut into one
    fragment per expert under its global name (``...experts.<e>.w_up.weight``), so checkpoints keep
    per-expert keys whatever the layout in memory. Every engine returns these."""
    return split_rows(fragments, _expert_rows(module))


def per_expert_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{parameter name: whole tensor} with each stacked expert matrix cut into its experts' rows."""
    rows = _expert_rows(module)
    out = {}
    for name, t in tensors.items():
        if name in rows:
            out.update({key: t[j].contiguous() for j, key in enumerate(rows[name])})
        else:
            out[name] = t
    return out
