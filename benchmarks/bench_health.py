"""What the non-finite guard and the progress watchdog cost per optimizer step, as a ratio.

``python -m benchmarks.bench_health [--pairs 4] [--steps 40]``

Two measurements:

* **In process, exact**: the guard's and the watchdog's Python work of one step (one
  ``NonFiniteGuard.check``, the step's ``Watchdog.beat`` calls with its threads running, the
  strict-JSON pass over a metrics row) timed over many repetitions, over the median step time of
  the end-to-end runs below.
* **End to end, paired**: the same 2-rank ZeRO-2 run of a tiny model, with the guard and watchdog
  (as shipped) and without them (``_BARE``: the guard's check and the watchdog patched out, the
  groups' timeouts untouched), alternated ``--pairs`` times; the wall time of ``Trainer.fit`` per
  step, median over pairs. On a shared 2-core machine this ratio carries the machine's noise
  (several %), far above the cost it tries to see: the in-process figure is the one to quote.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

_WRAPPER = """
import json, os, runpy, sys, time
import moe_dist.run.trainer as trainer
if os.environ.get("BENCH_BARE") == "1":
    import moe_dist.run.watchdog as watchdog
    from moe_dist.run.guard import NonFiniteGuard

    class _Idle:
        keep_groups = ()
        def beat(self, *a, **k): pass
        def after_step(self): pass
        def stop(self): pass

    watchdog.arm = lambda cfg, rt, tr, keep_groups=(): _Idle()
    NonFiniteGuard.check = lambda self, record, bad: None
fit = trainer.Trainer.fit
def timed(self, *a, **k):
    t0, s0 = time.perf_counter(), self.state.step
    fit(self, *a, **k)
    if os.environ.get("RANK", "0") == "0":
        with open(os.environ["BENCH_OUT"], "w") as f:
            json.dump({"seconds": time.perf_counter() - t0, "steps": self.state.step - s0}, f)
trainer.Trainer.fit = timed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(work: Path, name: str, steps: int, bare: bool) -> float:
    from tests.distributed.harness import check_ranks, run_ranks
    from tests.distributed.trainrun import CPU_JSON, FAST, TRAIN

    out = work / f"{name}.json"
    argv = ["-c", _WRAPPER, TRAIN, "--deepspeed-config", CPU_JSON, *FAST, "--output-dir", str(work / name),
            "--max-steps", str(steps)]
    check_ranks(run_ranks(argv, 2, timeout=600, env={"BENCH_OUT": str(out), "BENCH_BARE": "1" if bare else "0",
                                                      "TORCHDYNAMO_DISABLE": "1"}))
    r = json.loads(out.read_text())
    return r["seconds"] / r["steps"]


def in_process_cost_s(micro_batches: int = 6, reps: int = 20000) -> float:
    """Seconds of guard + watchdog work per step (micro_batches forward/backward beats + 5 others)."""
    from moe_dist.run.guard import NonFiniteGuard
    from moe_dist.run.metrics import json_safe
    from moe_dist.run.watchdog import Watchdog

    guard = NonFiniteGuard(3, 10.0, lambda _m: None)
    watch = Watchdog(tempfile.gettempdir(), 0, 1, 300.0, 600.0).start()
    row = {"step": 1, "loss": 4.2, "aux_loss": 0.01, "accuracy": 0.3, "perplexity": 66.0, "lr": 0.02, "lr_muon": 0.02,
           "lr_adamw": 3e-3, "tokens": 384, "tokens_per_s": 3000.0, "step_time_s": 0.1, "rss_peak_mb": 300.0,
           "grad_norm": 1.2, "expert_tokens": [1] * 8, "dropped_tokens": 0}
    t0 = time.perf_counter()
    for i in range(reps):
        for m in range(micro_batches):
            watch.beat(f"forward/backward of micro-batch {m + 1}/{micro_batches}", i)
        for phase in ("optimizer step", "metrics all-reduce", "stop vote", "checkpoint"):
            watch.beat(phase, i)
        row["step"] = i
        guard.check(row, 0)
        {k: json_safe(v) for k, v in row.items()}
    watch.stop()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        full, bare = [], []
        for i in range(args.pairs):  # alternate, so drifts of the machine hit both alike
            bare.append(_run(work, f"bare{i}", args.steps, True))
            full.append(_run(work, f"full{i}", args.steps, False))
    step_s = statistics.median(bare)
    cost = in_process_cost_s()
    print(f"end to end, {args.pairs} pairs of {args.steps} steps, 2 ranks ZeRO-2 tiny: per step with guard+watchdog "
          f"{statistics.median(full) * 1e3:.1f} ms, without {step_s * 1e3:.1f} ms, ratio "
          f"{statistics.median(full) / step_s:.4f} (pairs: "
          + ", ".join(f"{f / b:.3f}" for f, b in zip(full, bare)) + ")")
    print(f"in process: guard + watchdog work per step {cost * 1e6:.1f} us = {cost / step_s * 100:.4f}% of "
          f"the {step_s * 1e3:.1f} ms step")


if __name__ == "__main__":
    main()
