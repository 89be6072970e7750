"""Rich output of the training CLI (main process only): a progress bar, log lines, a summary table."""

from __future__ import annotations

from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class TrainUI:
    def __init__(self, enabled: bool, total_steps: int, start_step: int, log_every: int) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)
        self.progress: Optional[Progress] = None
        if enabled:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-")

    def __enter__(self) -> "TrainUI":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def print(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg)

    def on_step(self, r: dict[str, Any]) -> None:
        if not self.enabled or self.progress is None:
            return
        self.progress.update(self.task, completed=r["step"], loss=f"{r['loss']:.4f}")
        if r["step"] % self.log_every == 0 or "val_loss" in r:
            val = f" val {r['val_loss']:.4f}" if "val_loss" in r else ""
            self.console.print(
                f"step {r['step']:>6} loss {r['loss']:.4f} aux {r['aux_loss']:.4f} acc {r['accuracy']:.3f} "
                f"ppl {r['perplexity']:.2f} lr {r['lr']:.2e} tokens {r['tokens']} "
                f"tok/s {r['tokens_per_s']:.0f}{val}")

    def summary(self, history: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        if not self.enabled or not history:
            return
        t = Table(title="moe_dist run summary")
        t.add_column("metric")
        t.add_column("value", justify="right")
        first, last = history[0], history[-1]
        tps = [r["tokens_per_s"] for r in history[1:]] or [first["tokens_per_s"]]
        rows = {"steps": f"{first['step']} -> {last['step']}", "loss": f"{first['loss']:.4f} -> {last['loss']:.4f}",
                "accuracy": f"{last['accuracy']:.3f}", "tokens seen": str(last["tokens"]),
                "median tokens/s": f"{sorted(tps)[len(tps) // 2]:.0f}"}
        vals = [r["val_loss"] for r in history if "val_loss" in r]
        if vals:
            rows["val loss"] = f"{vals[-1]:.4f}"
        rows.update({k: str(v) for k, v in extra.items()})
        for k, v in rows.items():
            t.add_row(k, v)
        self.console.print(t)
