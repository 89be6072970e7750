"""Expert parallelism (EP): each of the ``ep_size`` ranks of an EP group holds ``E / ep_size`` experts.

Applied from outside the model (the model knows nothing of it), and engine-neutral: the engine
creates the groups and tells its optimizer about expert parameters (DeepSpeed:
``parallel/deepspeed/experts.py``), then :func:`shard_experts`

1. keeps this rank's rows of each layer's stacked expert matrices (``GroupedExperts.keep``). The
   experts keep their global ids, so checkpoint keys stay global: no two EP ranks share a key;
2. replaces the layer's dispatcher with :class:`ExpertParallelDispatcher`: counts first, then
   tokens, through ``all_to_all``; results come back the same way.

Legend: T tokens on this rank, K top-k, D d_model, E global experts, El local experts,
A assignments sent (sum of kept T*K), R assignments received.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn


def local_expert_ids(num_experts: int, ep_size: int, ep_rank: int) -> range:
    n = num_experts // ep_size
    return range(ep_rank * n, (ep_rank + 1) * n)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits whose backward is the reverse all_to_all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        in_splits, out_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class ExpertParallelDispatcher:
    """Route (token, expert) assignments to the EP rank owning the expert and combine the results.

    One host sync per layer forward: the all-to-all split sizes, fetched in one transfer. Capacity
    drops keep their rows (weight 0) so that no shape depends on a device value."""

    def __init__(self, group: Any, ep_size: int, ep_rank: int, num_experts: int) -> None:
        self.group, self.ep_size, self.ep_rank, self.num_experts = group, ep_size, ep_rank, num_experts
        self.local_ids = local_expert_ids(num_experts, ep_size, ep_rank)

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor,
                 experts: nn.Module, capacity_factor: Optional[float],
                 drop_base: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        from ..model.dropout import assignment_keys
        from ..model.moe import combine, flatten_assignments

        P, El = self.ep_size, len(self.local_ids)
        # Assignments sorted by expert (stable: token order inside an expert), as in LocalDispatcher.
        a = flatten_assignments(topk_idx_TK, topk_w_TK, self.num_experts, capacity_factor)

        # 1) counts: for each destination rank, how many rows of each of its experts we send.
        recv_PEl = torch.empty(P * El, dtype=a.counts_E.dtype, device=a.counts_E.device)  # [source rank, local expert]
        dist.all_to_all_single(recv_PEl, a.counts_E, group=self.group)
        # The one host sync: rows sent to / received from each rank, in one transfer.
        splits = torch.cat([a.counts_E.view(P, El).sum(1), recv_PEl.view(P, El).sum(1)]).tolist()
        in_splits, out_splits = splits[:P], splits[P:]

        # 2) tokens: rows arrive grouped by source rank, then by local expert; sort them expert-major.
        x_R = _AllToAll.apply(x_TD.index_select(0, a.token_A), out_splits, in_splits, self.group)
        local_R = torch.repeat_interleave(torch.arange(El, device=recv_PEl.device).repeat(P), recv_PEl,
                                          output_size=sum(out_splits))
        order_R = torch.argsort(local_R, stable=True)
        key_R = None
        if drop_base is not None:  # each row's dropout key travels with it (made on the token's rank)
            key_A = assignment_keys(drop_base, a.token_A, a.expert_A, self.num_experts)
            key_R = key_A.new_empty(sum(out_splits))
            dist.all_to_all_single(key_R, key_A, out_splits, in_splits, group=self.group)
            key_R = key_R.index_select(0, order_R)
        y_sorted = experts(x_R.index_select(0, order_R), recv_PEl.view(P, El).sum(0), key_R)
        y_R = torch.empty_like(y_sorted).index_copy(0, order_R, y_sorted)  # back to arrival order

        # 3) results go home; weight and sum per token.
        y_A = _AllToAll.apply(y_R, in_splits, out_splits, self.group)
        return combine(y_A, a, x_TD), a.dropped


def shard_experts(model: nn.Module, num_experts: int, ep_group: Any, ep_size: int, ep_rank: int) -> range:
    """Keep this EP rank's experts (rows of the stacked matrices) in every MoE layer and route
    through ``ep_group``; returns the global ids kept."""
    keep = local_expert_ids(num_experts, ep_size, ep_rank)
    for layer in model.moe_layers():
        layer.experts.keep(keep)
        layer.dispatcher = ExpertParallelDispatcher(ep_group, ep_size, ep_rank, num_experts)
    return keep
