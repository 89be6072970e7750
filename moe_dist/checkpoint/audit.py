"""Expert audit: from DCP metadata alone, prove every global expert was saved exactly once, whole.

Under expert parallelism a bug in the key mapping (two EP ranks writing the same local index,
an expert dropped) would otherwise only surface as a silently wrong model after a resume.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..config import ModelConfig
from .errors import CheckpointError
from .reader import CheckpointReader, chunks_tile

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.ffn\.experts\.(\d+)\.(.+)$")


def expected_expert_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter suffix -> numel of one expert."""
    d, f = cfg.d_model, cfg.d_ff
    mats = ("w_gate", "w_up", "w_down") if cfg.expert_type == "swiglu" else ("w_up", "w_down")
    return {f"{m}.weight": d * f for m in mats}


def audit_experts(folder: Path, cfg: ModelConfig) -> dict[str, Any]:
    """Raise CheckpointError unless every (layer, expert, matrix) is present once with full coverage."""
    md = CheckpointReader(Path(folder)).read_metadata()  # untrusted under `moe-ckpt verify`: allow-list unpickling
    want = expected_expert_params(cfg)
    seen: dict[tuple[int, int], set[str]] = {}
    for key, meta in md.state_dict_metadata.items():
        m = _EXPERT_RE.match(key)
        if not m:
            continue
        layer, expert, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(f"{folder}: {key} is not a tensor in the checkpoint metadata")
        if expert >= cfg.num_experts or layer >= cfg.n_layers:
            raise CheckpointError(f"{folder}: {key} names expert {expert} of layer {layer}, but the model has "
                                  f"{cfg.num_experts} experts and {cfg.n_layers} layers")
        if suffix in want and math.prod(meta.size) != want[suffix]:
            raise CheckpointError(f"{folder}: {key} has {math.prod(meta.size)} elements, expected {want[suffix]}")
        ok, why = chunks_tile(meta)
        if not ok:
            raise CheckpointError(f"{folder}: expert tensor {key} is not covered exactly once ({why})")
        seen.setdefault((layer, expert), set()).add(suffix)
    missing = [f"layer {l} expert {e}" for l in range(cfg.n_layers) for e in range(cfg.num_experts)
               if not set(want) <= seen.get((l, e), set())]
    if missing:
        raise CheckpointError(f"{folder}: experts missing from the checkpoint: {', '.join(missing[:8])}"
                              + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    return {"experts": len(seen), "layers": cfg.n_layers}
