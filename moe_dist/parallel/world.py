"""What a rank knows about the distributed world: the ``Runtime`` record every engine's set-up returns
and the training loop reads, and the one-rank rendezvous defaults.

Kept apart from ``parallel/runtime.py`` (which picks the engine and imports its set-up) so that the
engines' set-up modules can import this one without importing the module that imports them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .dims import BatchLayout


@dataclass
class Runtime:
    """What the training loop needs to know about the distributed world."""

    accelerator: Any
    rank: int
    world_size: int
    device: torch.device
    layout: BatchLayout
    ds_config: dict[str, Any]      # DeepSpeed's resolved config; {} under another engine
    engine: str = "deepspeed"      # parallel.engine
    engine_settings: Any = None    # another engine's resolved settings (fsdp2: Fsdp2Settings)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def zero_stage(self) -> Optional[int]:
        """DeepSpeed's ZeRO stage; None under an engine that has none."""
        if self.engine != "deepspeed":
            return None
        return int(self.ds_config["zero_optimization"]["stage"])

    @property
    def optimizer_kind(self) -> str:
        if self.engine != "deepspeed":
            return self.engine_settings.optimizer
        from .deepspeed.config import optimizer_kind

        return optimizer_kind(self.ds_config)

    @property
    def engine_label(self) -> str:
        """How logs name the engine and its sharding: ``ZeRO-2``, ``FSDP2``."""
        return f"ZeRO-{self.zero_stage}" if self.engine == "deepspeed" else "FSDP2"


def single_process_defaults() -> None:
    """Plain ``python moe_dist/train.py`` (no launcher): the env:// rendezvous of a one-rank process
    group still reads these; a value already set (a launcher, the user) wins."""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29500 + os.getpid() % 1000)),
                       ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
