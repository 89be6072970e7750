"""Expert parallelism (EP): each of the ``ep_size`` ranks of an EP group holds ``E / ep_size`` experts.

Applied from outside the model (the model knows nothing of it):

1. DeepSpeed's own groups (``deepspeed.utils.groups``) define who holds which experts: EP groups
   ``[0,1], [2,3], ...`` (all-to-all inside) and expert-data-parallel groups ``[0,2], [1,3], ...``
   (gradient reduction of expert params).
2. Non-local experts are deleted from each layer's ``experts`` ModuleDict. Keys are global expert
   indices, so parameter names (and checkpoint keys) stay global: no two EP ranks share a key.
3. Expert params are tagged the way DeepSpeed's MoE expects (``allreduce=False``, ``group_name``)
   and each MoE layer is marked as a DeepSpeed ``MoE`` module, so the engine splits optimizer
   groups into expert / non-expert and ZeRO-1/2 reduces and partitions expert gradients over the
   expert-data-parallel group only.
4. The layer's dispatcher is replaced by :class:`ExpertParallelDispatcher`: counts first, then
   tokens, through ``all_to_all``; results come back the same way.

Gradient scale: an expert's local gradient already sums the contributions of every EP rank's
tokens (the all-to-all backward brings them home); DeepSpeed then sums it over the
expert-data-parallel group and divides by the full data-parallel world size, which gives exactly
the gradient of the global mean loss. ``tests/distributed/test_expert_parallel.py`` checks this
against EP = 1, expert by expert.

Legend: T tokens on this rank, K top-k, D d_model, E global experts, El local experts,
A assignments sent (sum of kept T*K), R assignments received.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import RunConfig

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
    """Route (token, expert) assignments to the EP rank owning the expert and combine the results."""

    def __init__(self, group: Any, ep_size: int, ep_rank: int, num_experts: int) -> None:
        self.group, self.ep_size, self.ep_rank, self.num_experts = group, ep_size, ep_rank, num_experts
        self.local_ids = local_expert_ids(num_experts, ep_size, ep_rank)

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor,
                 experts: nn.ModuleDict, capacity_factor: Optional[float]) -> tuple[torch.Tensor, int]:
        from ..model.moe import flatten_assignments

        T, D = x_TD.shape
        E, P, El = self.num_experts, self.ep_size, len(self.local_ids)
        # Kept assignments sorted by expert (stable: token order inside an expert), as in LocalDispatcher.
        expert_A, token_A, weight_A, dropped = flatten_assignments(topk_idx_TK, topk_w_TK, E, capacity_factor)
        counts_E = torch.bincount(expert_A, minlength=E)

        # 1) counts: for each destination rank, how many rows of each of its experts we send.
        recv_counts = torch.empty(P * El, dtype=counts_E.dtype, device=counts_E.device)  # [source rank, local expert]
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        in_splits = counts_E.view(P, El).sum(1).tolist()                 # rows sent to each rank
        out_splits = recv_counts.view(P, El).sum(1).tolist()             # rows received from each rank

        # 2) tokens: rows arrive grouped by source rank, then by local expert.
        x_R = _AllToAll.apply(x_TD[token_A], out_splits, in_splits, self.group)
        local_R = torch.repeat_interleave(torch.arange(El, device=recv_counts.device).repeat(P), recv_counts)
        order_R = torch.argsort(local_R, stable=True)                    # expert-major order
        per_expert = recv_counts.view(P, El).sum(0).tolist()
        outs, start = [], 0
        xs = x_R[order_R]
        for j, n in enumerate(per_expert):
            # Every local expert runs, on zero rows if need be, so its params always get a gradient.
            outs.append(experts[str(self.local_ids[j])](xs[start:start + n]))
            start += n
        y_sorted = torch.cat(outs, 0) if outs else xs
        y_R = torch.empty_like(y_sorted).index_copy(0, order_R, y_sorted)  # back to arrival order

        # 3) results go home; weight and sum per token.
        y_A = _AllToAll.apply(y_R, in_splits, out_splits, self.group)
        y_TD = torch.zeros_like(x_TD)
        y_TD.index_add_(0, token_A, y_A * weight_A.unsqueeze(1).to(y_A.dtype))
        return y_TD, dropped


def _mark_as_deepspeed_moe(layer: nn.Module, group_name: str, num_experts: int, num_local: int, ep_size: int) -> None:
    """Make DeepSpeed's engine recognise ``layer`` as an MoE layer (``isinstance(m, deepspeed.moe.layer.MoE)``).

    The engine keys its expert handling (optimizer group split, expert-data-parallel gradient
    reduction) on that isinstance check. Our layer keeps its own forward and parameter names; the
    subclass only adds DeepSpeed's type and the attributes the engine reads.
    """
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    def set_deepspeed_parallelism(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        """The engine calls this to build EP groups; ours exist already (see apply_expert_parallel)."""

    cls = type(layer)
    if not isinstance(layer, DeepSpeedMoE):
        layer.__class__ = type(f"DeepSpeedMarked{cls.__name__}", (cls, DeepSpeedMoE),
                               {"set_deepspeed_parallelism": set_deepspeed_parallelism})
    layer.num_experts = num_experts
    layer.num_local_experts = num_local
    layer.expert_group_name = group_name
    layer.ep_size = ep_size


def apply_expert_parallel(model: nn.Module, cfg: RunConfig, rt: Any) -> Optional[dict[str, Any]]:
    """Shard the experts of every MoE layer over the EP group; no-op when ``ep_size == 1``.

    The degrees were checked by ``init_runtime`` (``dims.validate_ep``)."""
    ep = cfg.parallel.ep_size
    if ep == 1:
        return None
    from deepspeed.utils import groups

    group_name = f"ep_size_{ep}"
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    ep_group = groups._get_expert_parallel_group(group_name)
    ep_rank = groups._get_expert_parallel_rank(group_name)
    keep = local_expert_ids(cfg.model.num_experts, ep, ep_rank)
    for layer in model.moe_layers():
        for key in list(layer.experts.keys()):
            if int(key) not in keep:
                del layer.experts[key]
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = group_name
        layer.dispatcher = ExpertParallelDispatcher(ep_group, ep, ep_rank, cfg.model.num_experts)
        _mark_as_deepspeed_moe(layer, group_name, cfg.model.num_experts, len(keep), ep)
    return {"group_name": group_name, "ep_rank": ep_rank, "local_experts": list(keep)}
