"""The resumable global-cursor sampler: which samples form each optimizer step's global batch.

The order of samples is a function of ``(seed, epoch)`` only: epoch ``e`` is
``randperm(num_samples)`` under seed ``seed * 1_000_003 + e``, and global batch ``b`` of that epoch
is ``perm[b*G:(b+1)*G]`` (an incomplete final batch is skipped; the epoch rolls over). The state is
therefore just the cursor ``(epoch, batch_in_epoch)``: small, rank-free, and the same on every rank.

Ranks split a global batch, they do not own a shard of the data: ``rank_share`` cuts the G indices
into ``world_size`` contiguous parts and each part into micro-batches. The same global batches are
consumed whatever the world size, so a run can resume on another world size without repeating or
skipping a sample.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..logging_utils import warn_once
from .errors import DataError

_EPOCH_STRIDE = 1_000_003  # seed * stride + epoch: distinct seeds never share an epoch's generator


class GlobalCursorSampler:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        if global_batch_size <= 0:
            raise DataError(f"train.global_batch_size: expected a positive integer, found {global_batch_size}")
        if num_samples < global_batch_size:
            raise DataError(f"the training set has {num_samples} blocks, fewer than train.global_batch_size "
                            f"({global_batch_size}): not one full batch; use more data, a smaller train.seq_len "
                            "or a smaller global batch")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples_consumed = 0
        self._perm: Optional[torch.Tensor] = None
        self._perm_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch or self._perm is None:
            g = torch.Generator(device="cpu").manual_seed(self.seed * _EPOCH_STRIDE + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=g, device="cpu"), epoch
        return self._perm

    def next_global_batch(self) -> torch.Tensor:
        """The next G sample indices (a LongTensor ``[G]``); advances the cursor."""
        G = self.global_batch_size
        b = self.batch_in_epoch
        batch = self.epoch_permutation(self.epoch)[b * G:(b + 1) * G].clone()
        self.samples_consumed += G
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:  # keep the cursor canonical: never "end of epoch"
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return batch

    @staticmethod
    def rank_share(indices: torch.Tensor, rank: int, world_size: int, micro_batch_size: int) -> list[torch.Tensor]:
        """This rank's micro-batches of one global batch: part ``rank`` of ``world_size`` contiguous parts."""
        G = int(indices.numel())
        if world_size <= 0 or micro_batch_size <= 0:
            raise ValueError(f"world_size ({world_size}) and micro_batch_size ({micro_batch_size}) must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if G % (world_size * micro_batch_size) != 0:
            raise ValueError(f"global batch size ({G}) must be divisible by world_size x micro_batch_size "
                             f"({world_size} x {micro_batch_size} = {world_size * micro_batch_size}); "
                             "change train.global_batch_size or train.micro_batch_size")
        per_rank = G // world_size
        part = indices[rank * per_rank:(rank + 1) * per_rank]
        return list(part.split(micro_batch_size))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self.state_dict() if k not in state]
        if missing:
            raise DataError(f"sampler state is missing {', '.join(missing)}; the checkpoint is not a "
                            "GlobalCursorSampler state")
        if int(state["num_samples"]) != self.num_samples:
            raise DataError(f"the checkpoint's data cursor is over {state['num_samples']} training blocks but the "
                            f"data now has {self.num_samples}; the data, seq_len or val_fraction changed: resume "
                            "with the same data settings")
        if int(state["global_batch_size"]) != self.global_batch_size:
            raise DataError(f"the checkpoint's data cursor counts global batches of {state['global_batch_size']} "
                            f"but train.global_batch_size is now {self.global_batch_size}; resume with "
                            f"--set train.global_batch_size={state['global_batch_size']}")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise DataError(f"sampler state has epoch {epoch}, batch_in_epoch {batch}: batch_in_epoch must be in "
                            f"0..{self.batches_per_epoch - 1}")
        # The saved seed defines the saved order: adopt it, so the run continues where it stopped.
        if int(state["seed"]) != self.seed:
            warn_once(f"data order continues with the checkpoint's seed {state['seed']}, not train.seed {self.seed}")
        self.seed = int(state["seed"])
        self.epoch, self.batch_in_epoch = epoch, batch
        self.samples_consumed = int(state["samples_consumed"])
        self._perm, self._perm_epoch = None, -1

    def __repr__(self) -> str:
        return (f"GlobalCursorSampler(num_samples={self.num_samples}, global_batch_size={self.global_batch_size}, "
                f"seed={self.seed}, epoch={self.epoch}, batch_in_epoch={self.batch_in_epoch})")
