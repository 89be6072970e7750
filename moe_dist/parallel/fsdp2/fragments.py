"""FSDP2's shards in the checkpoint's language (:class:`~moe_dist.checkpoint.fragment.Fragment`).

A parameter sharded ``Shard(0)`` over a ``k``-rank mesh is cut by rows: position ``r`` holds rows
``[r * ceil(R / k), ...)``, ``ceil(R / k)`` of them or fewer at the end (possibly none). Row-major,
that is one contiguous flat run starting at ``first row * row numel``. The local tensor is fp32
(the master: FSDP2 casts to bf16 only when it all-gathers), and the optimizer's states are
DTensors placed like the parameter, so their local tensors are runs over the same elements.
A rank holding no rows of a parameter hands no fragment for it.

Legend: R rows (dimension 0), N numel of the parameter, n elements of this rank's run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...checkpoint.fragment import Fragment
from .muon import shard_rows


def local_run(p: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(flat offset, [n] view) of this rank's part of ``p`` (a DTensor sharded by rows, or a plain tensor)."""
    if not hasattr(p, "to_local"):
        return 0, p.detach().view(-1)
    local = p.to_local().detach()
    mesh = p.device_mesh
    k, r = mesh.size(), mesh.get_local_rank()
    rows = p.shape[0]
    per_row = math.prod(p.shape[1:])
    first = min(rows, r * -(-rows // k))
    expected = shard_rows(rows, k, r)
    if local.shape[0] != expected or not local.is_contiguous():
        raise RuntimeError(f"FSDP2 shard of a {tuple(p.shape)} parameter on mesh position {r} of {k}: expected "
                           f"{expected} contiguous rows, found {tuple(local.shape)}; its placement is "
                           f"{getattr(p, 'placements', None)}, not the Shard(0) this module reads")
    return first * per_row, local.view(-1)


def trainable_names(module: nn.Module) -> dict[int, tuple[str, ...]]:
    """id(param) -> (name, aliases) for every trainable parameter (a tied head is an alias)."""
    names: dict[int, tuple[str, ...]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names[id(p)] = names.get(id(p), ()) + (name,)
    return names


def local_fragments(module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[Fragment]:
    """Every non-empty run of a trainable parameter on this rank, with its optimizer's states."""
    state_of: dict[int, dict[str, Any]] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                state_of[id(p)] = opt.state[p]
    names = trainable_names(module)
    out = []
    for p in dict.fromkeys(module.parameters()):  # deduplicated, in a deterministic order
        if id(p) not in names:
            continue
        offset, master = local_run(p)
        if master.numel() == 0:
            continue
        state = state_of.get(id(p), {})
        states = {k: local_run(v)[1] for k, v in state.items()
                  if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape)}
        name, *aliases = names[id(p)]
        out.append(Fragment(name, tuple(p.shape), offset, master, states=states, owner=state,
                            aliases=tuple(aliases)))
    return out
