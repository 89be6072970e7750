"""Debugging aids that read the engine's state without changing it.

``MOE_DIST_DUMP_GRADS=<dir>`` makes the trainer save, at optimizer step ``MOE_DIST_DUMP_GRADS_STEP``
(default 0), the full reduced gradient of every parameter this rank holds, keyed by global
parameter name (``grads_rank<r>.safetensors``). The expert-parallel tests compare these files
between EP degrees to prove expert gradients are not scaled by the EP degree.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional



def grad_dump_probe_from_env(rank: int) -> Optional[Callable[[Any, int], None]]:
    out = os.environ.get("MOE_DIST_DUMP_GRADS")
    if not out:
        return None
    at = int(os.environ.get("MOE_DIST_DUMP_GRADS_STEP", "0"))

    def probe(engine: Any, step: int) -> None:
        if step != at:
            return
        from deepspeed.utils import safe_get_full_grad
        from safetensors.torch import save_file

        grads = {}
        for name, p in engine.module.named_parameters():
            g = safe_get_full_grad(p)  # collective over the param's data-parallel group: every rank calls it
            if g is not None:
                grads[name] = g.detach().float().clone().contiguous()
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
