"""A DeepSpeedEngine seen through :class:`moe_dist.parallel.engine.Engine`."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...checkpoint.fragment import Fragment
from ..engine import per_expert_fragments, per_expert_tensors
from . import fragments


class DeepSpeedTrainEngine:
    """Wraps the ``DeepSpeedEngine`` that ``accelerator.prepare`` returns (``ds``)."""

    def __init__(self, ds: Any) -> None:
        fragments.zero_stage(ds)  # refuse an optimizer the checkpoint cannot read, now rather than at a save
        self.ds = ds
        self.module = ds.module
        self.device = ds.device

    def __call__(self, tokens_BT: torch.Tensor, **kwargs: Any) -> Any:
        return self.ds(tokens_BT, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.ds.optimizer.param_groups

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's whole reduced gradient (between the last backward and ``step``; collective)."""
        from deepspeed.utils import safe_get_full_grad

        grads = {}
        for name, p in self.module.named_parameters():
            g = safe_get_full_grad(p)  # collective over the param's data-parallel group: every rank calls it
            if g is not None:
                grads[name] = g.detach().float().clone().contiguous()
        return per_expert_tensors(self.module, grads)

    # ---- checkpoint hooks
    def checkpoint_fragments(self) -> list[Fragment]:
        return per_expert_fragments(self.module, fragments.local_fragments(self.ds))

    def has_optimizer_state(self) -> bool:
        return fragments.has_optimizer_states(self.ds)

    def materialize_optimizer_state(self) -> bool:
        return fragments.materialize_optimizer_states(self.ds)

    def sync_weights_from_masters(self) -> None:
        fragments.sync_model_weights(self.ds)
