"""What FSDP2 applies to the model: expert parallelism, then ``fully_shard`` per expert, per block
and at the root.

1. Experts: each EP rank keeps ``E / ep`` experts (``expert_parallel.shard_experts``, over the
   mesh's ``ep`` group), and each layer's stacked experts are one FSDP2 unit sharded over the
   mesh's ``dp`` dimension (the ranks holding the same experts). ``Shard(0)`` of a stacked matrix
   cuts between experts, so a rank holds whole experts (or none) and Muon needs no exchange for them.
2. Each transformer block is a unit over the whole world (its attention, norms and router; its
   experts are already managed), and the root takes what is left (embedding, final norm, head;
   a tied head is one parameter).

3. A model built on the meta device (``parallel.sharded_build``, the default) gets real memory only
   after sharding: :func:`make_shards` writes each parameter's rows for this rank, so no rank ever
   holds the whole model.

Gradient scale: FSDP2 averages a unit's gradient over its mesh. A dense weight's is the mean over
the world, which is the gradient of the global mean loss. An expert's local gradient already sums
what every EP rank's tokens contributed (the all-to-all brings them home), so its average over
``dp`` is ``ep`` times too large; the engine divides it by ``ep`` after the last backward
(``set_gradient_divide_factor`` would do it inside the reduce-scatter, but gloo lacks the
PREMUL_SUM it needs).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..expert_parallel import shard_experts
from .setup import Fsdp2Settings, Meshes


def policies(s: Fsdp2Settings) -> dict[str, Any]:
    """``fully_shard`` keyword arguments for the settings: mixed precision and offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    # Pinned host memory needs an accelerator: torch refuses to pin on a machine without one.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if s.cpu_offload else OffloadPolicy()
    kw: dict[str, Any] = {"offload_policy": offload}
    if s.precision == "bf16":  # compute in bf16; the shards (the masters) and the reduction stay fp32
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return kw


def expert_params(model: nn.Module) -> set[int]:
    """id() of every expert parameter this rank holds."""
    return {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}


def apply_fsdp2(model: nn.Module, num_experts: int, meshes: Meshes, s: Fsdp2Settings) -> nn.Module:
    """Shard ``model`` in place (experts over ``ep``, then FSDP2 units); returns it (now an FSDPModule)."""
    from torch.distributed.fsdp import fully_shard

    if s.ep_size > 1:
        shard_experts(model, num_experts, meshes.ep.get_group(), s.ep_size, meshes.ep.get_local_rank())
    kw = policies(s)
    for layer in model.moe_layers():
        fully_shard(layer.experts, mesh=meshes.dp, **kw)  # the stacked experts: Shard(0) splits whole experts
    for block in model.layers:
        fully_shard(block, mesh=meshes.world, **kw)
    fully_shard(model, mesh=meshes.world, **kw)
    return model


def make_shards(model: nn.Module, fill: Callable[[str, torch.Tensor], None], device: torch.device) -> None:
    """Give the meta parameters of a sharded ``model`` memory on ``device`` and their values.

    ``fill(name, full)`` writes a parameter's full fp32 value into a CPU tensor (the model's own
    ``init_parameter`` or ``--init-from``'s reader, as for DeepSpeed's build in
    ``parallel/materialize.py``), through one staging buffer sized for the largest parameter; this
    rank keeps the rows FSDP2 gives it (dimension 0 split as ``torch.chunk`` does), so the values are
    those of a full build, bit for bit, on any mesh."""
    model.to_empty(device=device)
    params = list(model.named_parameters())  # deduplicated: a tied weight once, under its first name
    staging = torch.empty(max(p.numel() for _, p in params), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for name, p in params:
            full = staging[:p.numel()].view(p.shape)
            fill(name, full)
            local = p.to_local() if hasattr(p, "to_local") else p
            mesh = getattr(p, "device_mesh", None)
            n, r = (mesh.size(), mesh.get_local_rank()) if mesh is not None else (1, 0)
            rows = full.chunk(n, dim=0) if full.ndim else (full,)
            part = rows[r] if r < len(rows) else full[:0]
            if tuple(part.shape) != tuple(local.shape):
                raise RuntimeError(f"FSDP2 shard of {name}: this rank holds {tuple(local.shape)}, torch.chunk of "
                                   f"{tuple(full.shape)} over {n} gives {tuple(part.shape)}")
            local.copy_(part)
