"""Expert parallelism the DeepSpeed way: DeepSpeed's own groups and its MoE markings.

1. DeepSpeed's groups (``deepspeed.utils.groups``) define who holds which experts: EP groups
   ``[0,1], [2,3], ...`` (all-to-all inside) and expert-data-parallel groups ``[0,2], [1,3], ...``
   (gradient reduction of expert params). DeepSpeed offers no public call that creates them
   without its own MoE layer, so this module (and only it) calls the private ``groups._*``.
2. Expert params are tagged the way DeepSpeed's MoE expects (``allreduce=False``, ``group_name``).
   ZeRO-1/2: each MoE layer is marked as a DeepSpeed ``MoE`` module, so the engine splits optimizer
   groups into expert / non-expert and reduces and partitions expert gradients over the
   expert-data-parallel group only. ZeRO-3 refuses that marking ("Native DeepSpeed MoE is not
   supported with ZeRO Stage 3"); there the params carry AutoEP's placement tags instead
   (``ds_zero_placement_family = "autoep_expert"`` and the partition group), and ZeRO-3
   partitions each expert param over its expert-data-parallel group, keeps expert params in
   sub-groups of their own, averages their gradients by the full data-parallel size and adds the
   sub-group's squared gradient norm over the expert-data-parallel group, then the EP group
   (``stage3.py``: ``_autoep_expert_parallel_group``), so each expert counts once in the clip norm.
3. The sharding itself is engine-neutral (:func:`moe_dist.parallel.expert_parallel.shard_experts`).

Gradient scale: an expert's local gradient already sums the contributions of every EP rank's
tokens (the all-to-all backward brings them home); DeepSpeed then sums it over the
expert-data-parallel group and divides by the full data-parallel world size, which gives exactly
the gradient of the global mean loss, under ZeRO-1, 2 and 3. ``tests/distributed/test_expert_parallel.py``
checks this against EP = 1, expert by expert, and the clip norm with it.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ...config import RunConfig
from ..expert_parallel import shard_experts


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


def _tag_for_zero3(p: nn.Parameter, group_name: str, groups: Any) -> None:
    """Tag an expert param the way DeepSpeed's AutoEP does, so ZeRO-3 partitions it over the
    expert-data-parallel group and reduces its gradient there (``stage3.py``:
    ``_autoep_expert_parallel_group``). ZeRO-3 refuses layers marked as DeepSpeed ``MoE``."""
    p.ds_zero_placement_family = "autoep_expert"
    p.ds_zero_partition_group_name = group_name
    p.ds_zero_partition_process_group = groups._get_expert_data_parallel_group(group_name)


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
    keep = shard_experts(model, cfg.model.num_experts, ep_group, ep, ep_rank)
    zero3 = rt.zero_stage == 3
    for layer in model.moe_layers():
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = group_name
            if zero3:
                _tag_for_zero3(p, group_name, groups)
        if not zero3:
            _mark_as_deepspeed_moe(layer, group_name, cfg.model.num_experts, len(keep), ep)
    return {"group_name": group_name, "ep_rank": ep_rank, "local_experts": list(keep)}
