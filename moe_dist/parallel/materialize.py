"""Sharded start-up: no rank ever holds the whole model.

The model is built on the meta device (shapes, no memory), expert parallelism deletes the experts a
rank does not own, then :func:`materialize` gives each remaining parameter real memory, one
parameter at a time: its full values are written in fp32 on the CPU by ``fill(name, tensor)``
(the model's own :meth:`~moe_dist.model.MoETransformer.init_parameter`, or ``--init-from``'s
reader), cast to the training dtype on the training device, and handed to ``convert`` (ZeRO-3:
partition it at once, see ``parallel/deepspeed/zero_init.py``) before the next one is made.

Peak host memory at start-up is therefore one parameter in fp32 (a layer's stacked expert matrix, or
the embedding), not the model. Values
do not depend on the layout: ``fill`` sees the global name and the full shape of each parameter.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

Fill = Callable[[str, torch.Tensor], None]          # (parameter name, full fp32 CPU tensor) -> writes it
Convert = Callable[[nn.Module, list[nn.Parameter]], None]  # (module, its new parameters) -> e.g. partition


def materialize(model: nn.Module, fill: Fill, device: torch.device, dtype: torch.dtype,
                convert: Optional[Convert] = None) -> int:
    """Replace every meta parameter of ``model`` by a real one on ``device`` in ``dtype``, parameter by
    parameter (in ``model.modules()`` order); returns the largest number of elements made at once.

    Attributes set on a meta parameter (expert parallelism's tags) carry over to the real one; a
    parameter shared by two modules (tied embeddings) is made once, under its first name.

    Full values are written into one fp32 staging buffer on the CPU, sized for the largest parameter and
    reused: allocating and freeing a full tensor per parameter would leave the freed ones in the
    allocator's heap, interleaved with the partitions ZeRO-3 keeps (measured: the RSS of a sharded
    100m build on 2 ranks then exceeded the full build's). When ``convert`` partitions on the CPU in
    fp32 it reads the staging view itself and copies out this rank's partition."""
    first_name = {}
    for name, p in model.named_parameters():  # deduplicated: a tied weight keeps its first name
        first_name[id(p)] = name
    made: dict[int, nn.Parameter] = {}
    largest = max((p.numel() for p in model.parameters()), default=0)
    staging = torch.empty(largest, dtype=torch.float32, device="cpu")
    in_place = convert is not None and torch.device(device).type == "cpu" and dtype == torch.float32
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in made:                    # tied: already made for another module
                setattr(module, key, made[id(p)])
                continue
            if not p.is_meta:
                raise ValueError(f"materialize: parameter {first_name[id(p)]} is on {p.device}, expected the meta "
                                 "device; build the model with model.build(cfg, device='meta')")
            full = staging[:p.numel()].view(p.shape)
            fill(first_name[id(p)], full)
            data = full if in_place else full.to(device=device, dtype=dtype, copy=True)
            real = nn.Parameter(data, requires_grad=p.requires_grad)
            real.__dict__.update(p.__dict__)     # EP tags: allreduce, group_name, ZeRO-3 partition group
            setattr(module, key, real)
            made[id(p)] = real
            if convert is not None:
                convert(module, [real])
                # a parameter kept whole must not stay a staging view
                if real.data.numel() and real.data.untyped_storage().data_ptr() == staging.untyped_storage().data_ptr():
                    real.data = real.data.clone()
    return largest


def fill_full(model: nn.Module, fill: Fill) -> None:
    """Apply ``fill`` to every parameter of an already built (full, unsharded) model: the same values
    :func:`materialize` would give."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = torch.empty(p.shape, dtype=torch.float32, device="cpu")
            fill(name, full)
            p.copy_(full)
