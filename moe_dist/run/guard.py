"""The non-finite guard: notice a diverging run at the step it happens, not after the checkpoints hold a dead model.

Every optimizer step already reduces its loss over the world (``metrics.StepAccumulator``) and its
gradient norm (each engine's clip norm): both are global values, the same on every rank. The
accumulator also carries, in the same all-reduce, how many ranks saw a non-finite gradient norm,
so the step's verdict costs no collective and no host read of its own.

A step whose gradient norm is not finite makes no update: DeepSpeed's ZeRO-1/2/3 skip it themselves
(its overflow check, on for fp32 and bf16) and the FSDP2 engine skips it in ``step``. A step whose
loss is not finite has no finite gradient either. The guard counts such steps, marks them in
``metrics.jsonl`` (``nonfinite``: true; ``MetricsLog`` writes non-finite values as strings, so the
file stays JSON), and after
``train.max_nonfinite_steps`` in a row raises :class:`Diverged` (exit code ``exit_codes.DIVERGED``).
While a streak lasts no checkpoint is saved. A finite loss above ``train.loss_spike_factor`` times
the running mean is one warning line.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

SPIKE_WARMUP = 5  # steps before the running mean is trusted
SPIKE_DECAY = 0.9  # weight of the past in the running mean


class Diverged(RuntimeError):
    """Too many non-finite steps in a row; the message is the ``error:`` line."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int, spike_factor: float, warn: Callable[[str], None]) -> None:
        self.max_in_a_row, self.spike_factor, self.warn = max_in_a_row, spike_factor, warn
        self.streak = 0  # non-finite steps in a row, up to now
        self.skipped = 0  # non-finite steps in this process's life
        self.mean: Optional[float] = None  # running mean of finite losses
        self.seen = 0
        self.diverged: Optional[str] = None  # the error line, once the streak reached max_in_a_row

    def check(self, record: dict[str, Any], bad_grad_ranks: int) -> None:
        """Judge one step from its reduced record (every rank alike): mark it and warn; at the limit set
        ``diverged`` (the loop writes the step's row, then calls :meth:`raise_if_diverged`)."""
        loss, norm = record["loss"], record.get("grad_norm")
        finite = (math.isfinite(loss) and (norm is None or math.isfinite(norm)) and bad_grad_ranks == 0)
        if finite:
            self.streak = 0
            self._spike(record["step"], loss)
            return
        self.streak += 1
        self.skipped += 1
        record["nonfinite"], record["skipped_steps"] = True, self.skipped
        what = f"loss {loss}, grad_norm {norm}"
        if self.streak >= self.max_in_a_row:
            self.diverged = (f"training diverged at step {record['step']}: {what}, {self.streak} non-finite step(s) in "
                           f"a row (train.max_nonfinite_steps={self.max_in_a_row}); no checkpoint was saved from "
                           "them; lower the learning rate, or resume an earlier checkpoint with --resume PATH")
            return
        self.warn(f"step {record['step']}: {what}: step skipped, no update ({self.streak} in a row of at most "
                  f"{self.max_in_a_row})")

    def _spike(self, step: int, loss: float) -> None:
        if self.spike_factor and self.mean is not None and self.seen >= SPIKE_WARMUP \
                and loss > self.spike_factor * self.mean:
            self.warn(f"step {step}: loss spike: {loss:.4g} is {loss / self.mean:.1f}x the running mean "
                      f"{self.mean:.4g} (train.loss_spike_factor={self.spike_factor:g})")
        self.mean = loss if self.mean is None else SPIKE_DECAY * self.mean + (1 - SPIKE_DECAY) * loss
        self.seen += 1

    def raise_if_diverged(self) -> None:
        if self.diverged is not None:
            raise Diverged(self.diverged)

    @property
    def healthy(self) -> bool:
        """False while a streak of non-finite steps lasts: the state is not worth a checkpoint."""
        return self.streak == 0
