"""Section train_engines: DeepSpeed ZeRO-2 against FSDP2, side by side, on 2 ranks.

Training: each (size, engine, EP) is one ``moe_dist/train.py`` run as 2 gloo ranks with the preset's
batch and sequence length and the default optimizer (Muon + AdamW); throughput is the median
``tokens_per_s`` of ``metrics.jsonl`` over the steps after the first. The two engines alternate
(the order rotates each round). Checkpoints: each run saves its last step (``checkpoint_log.jsonl``:
``total_s``, ``bytes``); a second run of the same engine resumes it with nothing left to train, and
the load time is the one its log line reports (``resumed from ... in X s``: metadata, shards, and
the engine's state refresh). DeepSpeed runs as ``launch_configs/cpu_zero2.json``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .common import REPO_ROOT, SIZES, Context, Section, fmt, median, ratio, run_distributed, spread

TITLE = "6b. Training engines on 2 ranks: DeepSpeed ZeRO-2 vs FSDP2, EP 1 and 2"
WORLD = 2
ENGINES = {"deepspeed": ["--deepspeed-config", str(REPO_ROOT / "launch_configs" / "cpu_zero2.json"),
                         "--zero-stage", "2"],
           "fsdp2": ["--engine", "fsdp2"]}
EPS = (1, 2)


def _train(ctx: Context, size: str, engine: str, ep: int, steps: int, round_: int, resume: bool = False
           ) -> tuple[list[dict[str, Any]], str]:
    out = ctx.scratch("engines", f"{size}-{engine}-ep{ep}-r{round_}")
    args = [str(REPO_ROOT / "moe_dist" / "train.py"), *SIZES[size], *ENGINES[engine], "--ep-size", str(ep),
            "--max-steps", str(steps), "--save-every", str(steps), "--set", "train.eval_every=0",
            "--output-dir", str(out)]
    if resume:
        args += ["--resume", "auto"]
    ranks = run_distributed(args, WORLD, timeout=3600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, ranks[0].output


def run(ctx: Context) -> Section:
    sec = Section(TITLE)
    plan = [("tiny", 8, 1)] if ctx.quick else [("tiny", 12, 2), ("100m", 4, 1)]
    res: dict[tuple[str, str, int], dict[str, Any]] = {}
    for size, steps, rounds in plan:
        combos = [(e, ep) for ep in EPS for e in ENGINES]
        for r in range(rounds):
            shift = r % len(combos)
            for engine, ep in combos[shift:] + combos[:shift]:
                print(f"  {size}: {engine} EP {ep}, {steps} steps (round {r + 1}/{rounds})", flush=True)
                rows, _ = _train(ctx, size, engine, ep, steps, r)
                acc = res.setdefault((size, engine, ep), {"tokens_per_s": [], "save_s": [], "load_s": []})
                acc["tokens_per_s"] += [row["tokens_per_s"] for row in rows[1:]]
                folder = ctx.scratch("engines", f"{size}-{engine}-ep{ep}-r{r}")
                log = [json.loads(x) for x in (folder / "checkpoint_log.jsonl").read_text().splitlines()]
                acc["save_s"].append(log[-1]["total_s"])
                acc["bytes"] = log[-1]["bytes"]
                _, out = _train(ctx, size, engine, ep, steps, r, resume=True)
                m = re.search(r"resumed from \S+ at step \d+ in ([0-9.]+)s", out)
                acc["load_s"].append(float(m.group(1)) if m else float("nan"))
    sec.data = {f"{s}/{e}/ep{p}": v for (s, e, p), v in res.items()}
    rows = []
    for size, _, _ in plan:
        for ep in EPS:
            base = median(res[(size, "deepspeed", ep)]["tokens_per_s"])
            for engine in ENGINES:
                r = res[(size, engine, ep)]
                tps = median(r["tokens_per_s"])
                rows.append([size, ep, engine, fmt(tps), spread(r["tokens_per_s"]), str(len(r["tokens_per_s"])),
                             ratio(tps, base), f"{median(r['save_s']):.2f}", f"{median(r['load_s']):.2f}",
                             f"{r['bytes'] / 2**20:.1f}"])
    sec.table(["size", "EP", "engine", "tokens/s (median)", "tokens/s range", "steps measured", "vs DeepSpeed",
               "save s", "load s", "checkpoint MiB"], rows,
              caption="moe_dist/train.py on 2 gloo ranks, preset batch, Muon + AdamW, fp32; DeepSpeed = ZeRO-2")
    return sec
