"""The training loop: one optimizer step = grad_accum micro-batches on every rank.

Kept free of set-up (``train.py``), parallel plumbing (``parallel/``) and checkpoint formats
(``checkpoint/``): it asks the sampler for the next global batch, runs forward/backward through
the engine (``parallel/engine.py``), sets the LR, and reports reduced metrics.
"""

from __future__ import annotations

import hashlib
import math
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import RunConfig
from ..data.loader import DataBundle, iter_val_batches
from ..data.sampler import GlobalCursorSampler
from ..host_syncs import HostSyncCounter, count_syncs_from_env
from ..logging_utils import get_logger
from .guard import NonFiniteGuard
from .metrics import MetricsLog, StepAccumulator
from .optim import LRSchedule
from ..parallel.runtime import Runtime


def micro_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of the RNG stream (router noise) of one micro-batch of the global batch.

    Micro-batch ``k`` of a global batch is the same sequences on any world size (ranks take
    contiguous, micro-batch-aligned parts), so seeding by (seed, step, k) gives every sequence the
    same noise whatever the world size: an interrupted run continues bitwise-identically on the
    same topology, and a run resumed on another world size sees the same randomness rather than
    one rank's saved stream replayed on another.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{micro_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class TrainState:
    """Progress counters that must survive a restart (saved in every checkpoint)."""

    step: int = 0
    tokens: int = 0
    last_val_loss: Optional[float] = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "last_val_loss": self.last_val_loss}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.tokens = int(d["step"]), int(d["tokens"])
        self.last_val_loss = d.get("last_val_loss")


class Trainer:
    def __init__(self, cfg: RunConfig, rt: Runtime, engine: Any, data: DataBundle, sampler: GlobalCursorSampler,
                 metrics: MetricsLog, state: Optional[TrainState] = None) -> None:
        self.cfg, self.rt, self.engine, self.data, self.sampler, self.metrics = cfg, rt, engine, data, sampler, metrics
        self.state = state or TrainState()
        self.schedule = LRSchedule.from_config(cfg.train)
        self.model = engine.module
        self.all_adamw = rt.optimizer_kind == "adamw"
        # Called as probe(engine, step) after the step's last backward, before the optimizer step
        # (see moe_dist.debug); None in normal runs.
        self.grad_probe: Optional[Callable[[Any, int], None]] = None
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, cfg.train.loss_spike_factor, get_logger().warning)
        self.watch: Any = None  # the progress watchdog (run/watchdog.py): beat(phase, step, long) marks progress
        self.count_syncs = count_syncs_from_env()  # MOE_DIST_COUNT_SYNCS=1: host_syncs per step in the metrics

    def _beat(self, phase: str, step: int, long: bool = False) -> None:
        """Tell the progress watchdog (if armed) which phase of which step this rank is in."""
        if self.watch is not None:
            self.watch.beat(phase, step, long=long)

    # ------------------------------------------------------------------ one step
    def _moe_stats(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Tokens per expert and dropped assignments of the last forward, summed over layers (on the device)."""
        counts, dropped = None, None
        for layer in self.model.moe_layers():
            c, d = layer.last_tokens_per_expert, layer.last_dropped
            if c is not None:
                counts = c.clone() if counts is None else counts + c
            if d is not None:
                dropped = d.clone() if dropped is None else dropped + d
        return counts, dropped

    def train_step(self) -> dict[str, Any]:
        if not self.count_syncs:
            return self._train_step()
        with HostSyncCounter() as syncs:
            record = self._train_step()
        record["host_syncs"], record["host_sync_ops"] = syncs.total, dict(syncs.counts)
        return record

    def _train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        step = self.state.step
        lrs = self.schedule.apply(self.engine.param_groups, step, all_adamw=self.all_adamw)
        indices = self.sampler.next_global_batch()
        micro = self.sampler.rank_share(indices, self.rt.rank, self.rt.world_size, self.rt.layout.micro_batch_size)
        acc = StepAccumulator(self.cfg.model.num_experts, self.rt.device)
        self.engine.train()
        first_micro = self.rt.rank * len(micro)  # index of this rank's first micro-batch in the global batch
        beat = self._beat
        for i, idx in enumerate(micro):
            beat(f"forward/backward of micro-batch {i + 1}/{len(micro)}", step + 1)
            torch.manual_seed(micro_seed(self.cfg.train.seed, step, first_micro + i))
            block = self.data.train_blocks[idx].to(self.rt.device)
            inputs, targets = block[:, :-1], block[:, 1:]
            logits, aux = self.engine(inputs)
            ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            loss = ce + aux if aux is not None else ce
            self.engine.backward(loss)
            if i == len(micro) - 1 and self.grad_probe is not None:
                self.grad_probe(self.engine, step)  # reduced grads exist between the last backward and step
            if i == len(micro) - 1:
                beat("optimizer step (gradient reduction, norm, update)", step + 1)
            self.engine.step()
            counts, dropped = self._moe_stats()
            acc.add(ce, aux, logits, targets, counts, dropped)
        beat("metrics all-reduce", step + 1)
        grad_norm = self.engine.grad_norm()
        stats = acc.reduce(grad_nonfinite=grad_norm is not None and not math.isfinite(grad_norm))
        self.state.step += 1
        self.state.tokens += int(indices.numel()) * self.cfg.train.seq_len
        elapsed = time.perf_counter() - t0
        record = {"step": self.state.step, "loss": stats["loss"], "aux_loss": stats["aux_loss"],
                  "accuracy": stats["accuracy"], "perplexity": stats["perplexity"],
                  "lr": lrs["adamw"] if self.all_adamw else lrs["muon"], "lr_muon": lrs["muon"],
                  "lr_adamw": lrs["adamw"], "tokens": self.state.tokens,
                  "tokens_per_s": indices.numel() * self.cfg.train.seq_len / max(elapsed, 1e-9),
                  "step_time_s": elapsed,
                  "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this rank, Linux KiB
                  "grad_norm": grad_norm,
                  "expert_tokens": stats["expert_tokens"], "dropped_tokens": stats["dropped_tokens"]}
        self.guard.check(record, stats["bad_grad_ranks"])  # a skipped step is marked; too many stop fit()
        if self.rt.device.type == "cuda":  # what moe-plan's GPU figure estimates (benchmarks/gpu_check.py compares)
            record["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**20
        return record

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy over a fixed global validation sample (the same on any world size)."""
        self.engine.eval()
        device = self.rt.device
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # [summed CE, targets] of this rank
        for inputs, targets, counts in iter_val_batches(self.data.val_blocks, self.rt.rank, self.rt.world_size,
                                                        self.rt.layout.micro_batch_size,
                                                        self.cfg.train.eval_batches):
            logits, _ = self.engine(inputs.to(device), return_aux_loss=False)  # [B, T, V]
            if counts:
                ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.to(device).reshape(-1),
                                     reduction="sum")
                sums += torch.stack([ce.double(), torch.tensor(float(targets.numel()), dtype=torch.float64,
                                                                device=device)])
        self.engine.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        loss = float(sums[0] / sums[1].clamp(min=1))
        self.state.last_val_loss = loss
        return loss

    # ------------------------------------------------------------------ the loop
    def fit(self, on_step: Optional[Callable[[dict[str, Any]], None]] = None,
            should_stop: Callable[[], bool] = lambda: False,
            after_step: Optional[Callable[[], None]] = None) -> None:
        """Train until ``train.max_steps``; ``after_step`` runs checkpointing, ``should_stop`` signals."""
        every = self.cfg.train.eval_every
        beat = self._beat
        while self.state.step < self.cfg.train.max_steps:
            beat("stop vote", self.state.step + 1)
            if should_stop():
                break
            record = self.train_step()
            if every and (self.state.step % every == 0 or self.state.step == self.cfg.train.max_steps):
                beat("validation", self.state.step, long=True)
                record["val_loss"] = self.evaluate()
            if self.rt.is_main:
                self.metrics.write(record)
            if on_step is not None:
                on_step(record)
            self.guard.raise_if_diverged()
            if after_step is not None and self.guard.healthy:  # no checkpoint while a non-finite streak lasts
                beat("checkpoint", self.state.step, long=True)
                after_step()
