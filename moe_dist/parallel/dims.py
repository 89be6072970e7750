"""Parallel degrees and the batch layout: checked once, torch-free, shared by the trainer and the planner.

Nothing here imports torch, DeepSpeed or Accelerate, so ``moe-plan`` can ask the same questions
the trainer asks (does this EP degree fit? how many accumulation steps?) without building anything.

    global batch = micro batch x grad_accum x data-parallel size (= world size: every rank reads
    its own data; expert parallelism splits experts, not data)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError, RunConfig

WORKING_COMBINATIONS = ("ZeRO-1 or ZeRO-2 with any --ep-size dividing the world size and num_experts "
                        "(optimizer offload included), or ZeRO-3 with --ep-size 1")


def validate_ep(cfg: RunConfig, world_size: int, zero_stage: Optional[int] = None) -> None:
    """Check the EP degree before anything is built; errors name the field and both values.

    ``zero_stage``: the resolved stage (launch JSON + flags); None checks ``cfg.parallel.zero_stage``
    only, which is None when the launch JSON decides."""
    ep, e = cfg.parallel.ep_size, cfg.model.num_experts
    fits = ", ".join(str(d) for d in range(1, min(e, world_size) + 1) if e % d == 0 and world_size % d == 0)
    if e % ep != 0:
        raise ConfigError(f"model.num_experts ({e}) must be divisible by parallel.ep_size ({ep}); "
                          f"with {world_size} processes choose --ep-size from {fits}")
    if world_size % ep != 0:
        raise ConfigError(f"world size ({world_size}) must be divisible by parallel.ep_size ({ep}); "
                          f"with {world_size} processes choose --ep-size from {fits}, "
                          f"or launch a multiple of {ep} processes")
    stage = zero_stage if zero_stage is not None else cfg.parallel.zero_stage
    if ep > 1 and stage == 3:
        raise ConfigError(f"--ep-size {ep} with ZeRO-3 is not supported (DeepSpeed's ZeRO-3 does not partition "
                          f"expert-parallel layers outside AutoEP). Working combinations: {WORKING_COMBINATIONS}")


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch is split: global = micro x grad_accum x data_parallel_size."""

    global_batch_size: int
    micro_batch_size: int
    grad_accum: int
    data_parallel_size: int


def batch_layout(cfg: RunConfig, world_size: int) -> BatchLayout:
    """Derive grad accumulation so the global batch is the same on any world size."""
    g, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if g % (m * world_size) != 0:
        ok = [w for w in range(1, 17) if g % (m * w) == 0]
        raise ConfigError(
            f"train.global_batch_size ({g}) must be divisible by train.micro_batch_size ({m}) x world size "
            f"({world_size}) = {m * world_size}; with this micro batch it splits on world sizes {ok}. "
            f"Change --set train.global_batch_size or train.micro_batch_size."
        )
    return BatchLayout(g, m, g // (m * world_size), world_size)
