"""Debugging aids that read the engine's state without changing it.

``MOE_DIST_DUMP_GRADS=<dir>`` makes the trainer save, at optimizer step ``MOE_DIST_DUMP_GRADS_STEP``
(default 0), the full reduced gradient of every parameter this rank holds, keyed by global
parameter name (``grads_rank<r>.safetensors``). The expert-parallel tests compare these files
between EP degrees to prove expert gradients are not scaled by the EP degree.

``MOE_DIST_DUMP_LOADED=<dir>`` makes a resumed run save, right after the load, what its engine now
holds (weights and optimizer states) as a DCP folder: the cross-engine tests compare it with the
checkpoint it loaded, key by key, bitwise.

``MOE_DIST_STRICT_DEVICE=1`` turns an implicit device into an error (see :func:`strict_device_from_env`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

STRICT_DEVICE_ENV = "MOE_DIST_STRICT_DEVICE"


def strict_device_from_env() -> bool:
    """``MOE_DIST_STRICT_DEVICE=1``: from here on, a tensor made without ``device=`` is a meta tensor.

    On a GPU, a factory call without a device makes a CPU tensor beside CUDA ones, or hands a CPU
    tensor to an NCCL collective: a crash at the first step, which no CPU test sees because there
    the implicit device happens to be the right one. With the default device set to ``meta``, such
    a tensor fails on this CPU machine too, as soon as it meets a real tensor (``Tensor on device
    meta is not on the expected device cpu``) or a gloo collective. Called once the model and
    engine are built (building them is the one place where the default device is meant to be
    used), by the trainer, ``moe-consolidate`` and ``moe-generate``; the tests run them all in
    this mode (``tests/distributed/test_strict_device.py``). Returns whether the mode is on.
    """
    if os.environ.get(STRICT_DEVICE_ENV, "") not in ("1", "true"):
        return False
    import torch

    torch.set_default_device("meta")
    return True


def grad_dump_probe_from_env(rank: int) -> Optional[Callable[[Any, int], None]]:
    out = os.environ.get("MOE_DIST_DUMP_GRADS")
    if not out:
        return None
    at = int(os.environ.get("MOE_DIST_DUMP_GRADS_STEP", "0"))

    def probe(engine: Any, step: int) -> None:
        if step != at:
            return
        from safetensors.torch import save_file

        grads = engine.full_gradients()  # collective: every rank calls it
        os.makedirs(out, exist_ok=True)
        save_file(grads, os.path.join(out, f"grads_rank{rank}.safetensors"))

    return probe


def dump_probe_logits_from_env(engine: Any, data: Any, rank: int) -> None:
    """``MOE_DIST_DUMP_LOGITS=<file>``: after training, run the first validation block through the
    engine in eval mode and save rank 0's logits (every rank runs the forward: ZeRO-3 gathers and
    expert-parallel all-to-alls are collectives). The consolidation tests compare a consolidated
    model's logits with these."""
    out = os.environ.get("MOE_DIST_DUMP_LOGITS")
    if not out:
        return
    import torch
    from safetensors.torch import save_file

    tokens = data.val_blocks[:1][:, :-1]
    engine.eval()
    with torch.no_grad():
        logits, _ = engine(tokens.to(engine.device), return_aux_loss=False)
    if rank == 0:
        save_file({"tokens": tokens.contiguous(), "logits": logits.float().cpu().contiguous()}, out)


def dump_loaded_state_from_env(engine: Any) -> None:
    """``MOE_DIST_DUMP_LOADED=<dir>``: save the engine's state through the checkpoint's own path
    (``EngineCheckpoint``), no manifest or train state (collective: every rank calls it)."""
    out = os.environ.get("MOE_DIST_DUMP_LOADED")
    if not out:
        return
    import torch.distributed.checkpoint as dcp

    from .checkpoint.dcp_state import EngineCheckpoint

    dcp.save(EngineCheckpoint(engine).for_save(), checkpoint_id=out)
