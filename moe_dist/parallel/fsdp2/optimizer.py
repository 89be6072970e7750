"""The optimizers of an FSDP2 run: the split and hyper-parameters of the DeepSpeed runs.

``train.optimizer = adamw``: one ``torch.optim.AdamW`` over the two groups of
:func:`moe_dist.run.optim.param_groups` (decayed matrices, undecayed vectors), as DeepSpeed's AdamW.
``muon``: each group is cut into its Muon half (``uses_muon``: 2-D hidden matrices, router
included) and its AdamW half (embedding, head, norms), as DeepSpeed's ``Muon`` type does
(``_muon_param_groups``): Muon halves step with :class:`~.muon.ShardedMuon` at ``train.muon_lr``,
the others with ``torch.optim.AdamW`` at ``train.adamw_lr``; groups carry ``use_muon`` so the LR
schedule (``optim.LRSchedule.apply``) sets each one's rate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import TrainConfig
from ...run.optim import adamw_kernel, param_groups, tag_parameters
from .muon import ShardedMuon

ADAM_EPS = 1e-8  # what the DeepSpeed runs use (parallel/deepspeed/config.py)


def build_optimizers(model: nn.Module, kind: str, t: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    tag_parameters(model)
    groups = param_groups(model, t.weight_decay, t.weight_decay_on)
    adam_kw = {"lr": t.adamw_lr, "betas": tuple(t.adam_betas), "eps": ADAM_EPS, "weight_decay": t.weight_decay,
               **adamw_kernel(device)}
    if kind == "adamw":
        return [torch.optim.AdamW(groups, **adam_kw)]
    muon_groups: list[dict[str, Any]] = []
    adam_groups: list[dict[str, Any]] = []
    for g in groups:
        for use_muon, out in ((True, muon_groups), (False, adam_groups)):
            half = [p for p in g["params"] if bool(p.use_muon) is use_muon]
            if half:
                lr = t.muon_lr if use_muon else t.adamw_lr
                out.append({"params": half, "name": f"{g['name']}-{'muon' if use_muon else 'adam'}",
                            "weight_decay": g["weight_decay"], "use_muon": use_muon, "lr": lr})
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(adam_groups, **adam_kw)]
    if muon_groups:
        optimizers.append(ShardedMuon(muon_groups, lr=t.muon_lr, momentum=t.muon_momentum,
                                      weight_decay=t.weight_decay, device=device))
    return optimizers


def init_adamw_state(opt: torch.optim.AdamW, p: torch.Tensor) -> None:
    """The state torch's AdamW creates at its first step (not capturable, not fused): zero moments
    of the parameter's shape and placement and a float32 ``step`` on the host."""
    opt.state[p].update(step=torch.tensor(0.0, dtype=torch.float32, device="cpu"),
                        exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                        exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
