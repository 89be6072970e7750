"""A DeepSpeedEngine seen through :class:`moe_dist.parallel.engine.Engine`."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...checkpoint.fragment import Fragment
from ...run.optim import adamw_kernel
from ..engine import per_expert_fragments, per_expert_tensors
from . import fragments


def prefer_fused_adamw(ds: Any) -> bool:
    """Run the torch AdamW that DeepSpeed builds for ``torch_adam`` (our CPU runs) fused.

    DeepSpeed passes only ``foreach`` to it, so on the CPU it would take torch's single-tensor path
    over ZeRO's flat partitions (see :func:`moe_dist.run.optim.adamw_kernel` for the cost). torch's
    AdamW reads ``fused`` from each group at every step, so setting it on the groups is enough; the
    state it creates (fp32 moments, a float32 ``step`` on the host) is the same. Returns whether it
    changed anything."""
    basic = getattr(ds.optimizer, "optimizer", None)
    if type(basic) not in (torch.optim.AdamW, torch.optim.Adam):
        return False  # DeepSpeed's FusedAdam / CPUAdam / Muon: already one kernel, or not ours to change
    params = [p for g in basic.param_groups for p in g["params"]]
    if not params or any(p.device.type != "cpu" for p in params):
        return False
    kernel = adamw_kernel(torch.device("cpu"))
    for g in basic.param_groups:
        g.update(foreach=False, **kernel)
    return bool(kernel.get("fused"))


class DeepSpeedTrainEngine:
    """Wraps the ``DeepSpeedEngine`` that ``accelerator.prepare`` returns (``ds``)."""

    def __init__(self, ds: Any) -> None:
        fragments.zero_stage(ds)  # refuse an optimizer the checkpoint cannot read, now rather than at a save
        self.ds = ds
        self.fused_adamw = prefer_fused_adamw(ds)
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
