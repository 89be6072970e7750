"""ZeRO-3 partitioning at construction: each parameter is partitioned as soon as it is made.

:func:`moe_dist.parallel.materialize.materialize` hands each module's new parameters to the
converter returned by :func:`zero3_converter`, which partitions them the way ``deepspeed.zero.Init``
does (``Init(module=...)``, documented as "partition an already-allocated model"; later modules go
through the ``convert_to_zero_parameters`` hook DeepSpeed attaches to every ZeRO parameter, which
its own engine uses). The engine then sees ZeRO parameters (``ds_id``) and neither casts nor moves
nor re-partitions them (``engine._configure_distributed_model``), so the parameters are made in
the training dtype.

Why not ``with deepspeed.zero.Init(): model = build(cfg)``: the context partitions every parameter
over the whole data-parallel world as its module is constructed, before expert parallelism deletes
the experts a rank does not own and tags the others with their expert-data-parallel group. Here
the experts are deleted on the meta device first, and an expert parameter carries
``ds_zero_partition_process_group`` (``experts._tag_for_zero3``) when it is converted, which
DeepSpeed's conversion honours (``partition_parameters._convert_to_deepspeed_param``); the engine
checks that afterwards (``_resolve_zero3_param_placement``).

Conversion broadcasts each parameter from the first rank of its partition group, so every rank of
a group must convert the same parameters in the same order: they do, since all build the same
modules in ``model.modules()`` order (expert-data-parallel peers own the same experts).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..materialize import Convert


def zero3_converter(ds_config: dict[str, Any]) -> Convert:
    """A ``convert(module, params)`` that partitions ``params`` with ZeRO-3 under ``ds_config``
    (offload_param included: partitions then live where the config says)."""
    import deepspeed

    first: list[nn.Parameter] = []

    def convert(module: nn.Module, params: list[nn.Parameter]) -> None:
        if not first:
            holder = nn.Module()
            for i, p in enumerate(params):
                holder.register_parameter(f"p{i}", p)
            deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config)
            first.append(params[0])
        else:
            first[0].convert_to_zero_parameters(param_list=params)

    return convert
