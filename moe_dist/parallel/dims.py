"""Parallel degrees and the batch layout: checked once, torch-free, shared by the trainer and the planner.

Nothing here imports torch, DeepSpeed or Accelerate, so ``moe-plan`` can ask the same questions
the trainer asks (does this EP degree fit? how many accumulation steps?) without building anything.

    global batch = micro batch x grad_accum x data-parallel size (= world size: every rank reads
    its own data; expert parallelism splits experts, not data)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, RunConfig

def validate_ep(cfg: RunConfig, world_size: int) -> None:
    """Check the EP degree before anything is built; errors name the field and both values.

    Any ZeRO stage works with any EP degree that passes (ZeRO-3 partitions expert params over their
    expert-data-parallel group, see ``parallel/deepspeed/experts.py``)."""
    ep, e = cfg.parallel.ep_size, cfg.model.num_experts
    fits = ", ".join(str(d) for d in range(1, min(e, world_size) + 1) if e % d == 0 and world_size % d == 0)
    if e % ep != 0:
        raise ConfigError(f"model.num_experts ({e}) must be divisible by parallel.ep_size ({ep}); "
                          f"with {world_size} processes choose --ep-size from {fits}")
    if world_size % ep != 0:
        raise ConfigError(f"world size ({world_size}) must be divisible by parallel.ep_size ({ep}); "
                          f"with {world_size} processes choose --ep-size from {fits}, "
                          f"or launch a multiple of {ep} processes")


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
