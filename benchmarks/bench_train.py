"""Section 6: training throughput on 2 ranks at ZeRO-1/2/3 and expert parallelism 1/2.

Each configuration is one ``moe_dist/train.py`` run as 2 gloo ranks (``tests.distributed.harness``,
as ``accelerate launch`` would start it), with the preset's own batch and sequence length;
throughput is the median ``tokens_per_s`` of ``metrics.jsonl`` over the steps after the first
(the first one pays for allocation and DeepSpeed's lazy set-up). Configurations rotate over
``rounds`` rounds. Combinations ``validate_ep`` rejects are listed with its message, not run.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from .common import (REPO_ROOT, SIZES, Context, Section, fmt, grouped_bars, median, new_figure, ratio,
                     run_distributed, spread)

TITLE = "6. Training throughput on 2 ranks: ZeRO stage x expert parallelism"
WORLD = 2
CONFIGS = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]  # (ZeRO stage, EP size)
BASELINE = (2, 1)


def _cfg(size: str, stage: int, ep: int) -> Any:
    from moe_dist.run.cli import parse

    return parse([*SIZES[size], "--zero-stage", str(stage), "--ep-size", str(ep)])[1]


def rejected(size: str, stage: int, ep: int) -> Optional[str]:
    """validate_ep's message if the trainer refuses this combination, else None."""
    from moe_dist.config import ConfigError
    from moe_dist.parallel.dims import validate_ep

    try:
        validate_ep(_cfg(size, stage, ep), WORLD)
    except ConfigError as e:
        return str(e)
    return None


def train_once(ctx: Context, size: str, stage: int, ep: int, steps: int, round_: int
               ) -> tuple[list[dict[str, Any]], str]:
    """metrics.jsonl rows of one run, and the optimizer its banner names (the trainer may change it)."""
    out = ctx.scratch("train", f"{size}-z{stage}-ep{ep}-r{round_}")
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    args = [str(REPO_ROOT / "moe_dist" / "train.py"), *SIZES[size], "--zero-stage", str(stage), "--ep-size", str(ep),
            "--max-steps", str(steps), "--save-every", "0", "--set", "train.eval_every=0", "--output-dir", str(out)]
    ranks = run_distributed(args, WORLD, timeout=3600)
    m = re.search(r"optimizer (\w+)", ranks[0].output)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return rows, m.group(1) if m else "?"


def run(ctx: Context) -> Section:
    sec = Section(TITLE)
    # (size, steps, rounds): tiny steps take ~0.4 s against ~20 s of start-up, so steps are cheap
    plan = [("tiny", 10, 1)] if ctx.quick else [("tiny", 16, 2), ("100m", 4, 1)]
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    skipped: dict[tuple[str, int, int], str] = {}
    for size, steps, rounds in plan:
        runnable = []
        for stage, ep in CONFIGS:
            why = rejected(size, stage, ep)
            if why:
                skipped[(size, stage, ep)] = why
            else:
                runnable.append((stage, ep))
        for r in range(rounds):
            shift = r % len(runnable)
            for stage, ep in runnable[shift:] + runnable[:shift]:
                print(f"  {size}: ZeRO-{stage} EP {ep}, {steps} steps (round {r + 1}/{rounds})", flush=True)
                rows, optimizer = train_once(ctx, size, stage, ep, steps, r)
                acc = results.setdefault((size, stage, ep), {"tokens_per_s": [], "step_time_s": [],
                                                             "optimizer": optimizer})
                acc["tokens_per_s"] += [row["tokens_per_s"] for row in rows[1:]]
                acc["step_time_s"] += [row["step_time_s"] for row in rows[1:]]
                acc["tokens_per_step"] = rows[-1]["tokens"] // rows[-1]["step"]
    sec.data = {f"{s}/zero{z}/ep{e}": v for (s, z, e), v in results.items()}
    rows = []
    for size, steps, rounds in plan:
        base = median(results[(size, *BASELINE)]["tokens_per_s"])
        for stage, ep in CONFIGS:
            key = (size, stage, ep)
            if key in skipped:
                rows.append([size, stage, ep, "-", "not run: rejected by validate_ep", "-", "-", "-"])
                continue
            r = results[key]
            tps = median(r["tokens_per_s"])
            rows.append([size, stage, ep, r["optimizer"], fmt(tps), spread(r["tokens_per_s"]),
                         f"{len(r['tokens_per_s'])}", ratio(tps, base)])
    sec.table(["size", "ZeRO", "EP", "optimizer", "tokens/s (median)", "tokens/s range", "steps measured",
               f"vs ZeRO-{BASELINE[0]} EP {BASELINE[1]}"], rows,
              caption="moe_dist/train.py on 2 gloo ranks, preset batch (global 12 sequences); median tokens_per_s of "
                      "metrics.jsonl over the steps after the first of each run")
    for (size, stage, ep), why in skipped.items():
        sec.note(f"{size} ZeRO-{stage} EP {ep} not run: {why}")
    optimizers = {r["optimizer"] for r in results.values()}
    if len(optimizers) > 1:
        sec.note(f"the runs did not all use the same optimizer ({', '.join(sorted(optimizers))}, as each run's banner "
                 "says): the throughput of those rows also differs by optimizer cost.")
    for size, _, _ in plan:
        stages, eps = sorted({s for s, _ in CONFIGS}), sorted({e for _, e in CONFIGS})
        fig, ax = new_figure()
        grouped_bars(ax, [f"ZeRO-{s}" for s in stages],
                     {f"EP {e}": [median(results[(size, s, e)]["tokens_per_s"]) if (size, s, e) in results else 0.0
                                  for s in stages] for e in eps},
                     "tokens/s (median)", f"{size}: training throughput on 2 ranks")
        width = 0.8 / len(eps)
        for gi, s in enumerate(stages):
            for ei, e in enumerate(eps):
                if (size, s, e) in skipped:
                    ax.text(gi + (ei - (len(eps) - 1) / 2) * width, 0, "not\nsupported", ha="center", va="bottom",
                            fontsize=8)
        sec.plot(fig, ctx.out, f"train_tokens_per_s_{size}.png", f"{size} training tokens/s")
    return sec
