"""Section 8: start-up memory on 2 ranks, 100m preset: the full fp32 build vs the sharded build.

Each case is one launch of ``tests/distributed/startup_worker.py`` as 2 gloo ranks (process group,
``build_model``, ``prepare_engine``), once with ``parallel.sharded_build=false`` (every rank builds
the full fp32 model, the engine shards it: the old path) and once with the sharded build (the
default), alternating, in this run. Per rank, from ``/proc/self/status``:

* build: the peak RSS of the process from its start to the end of ``build_model`` (the model
  built and, under ZeRO-3, partitioned; the full build still holds the whole model then);
* increase: that peak minus the RSS before the build (what the build itself adds);
* engine ready: the peak to the end of ``prepare_engine``. On this CPU-only machine the engine's
  fp32 optimizer states, gradients and buffers are host memory too and set that peak; on a GPU node
  they live on the GPU and the host peak is the build's.

Planned: ``moe-plan``'s start-up term (its ``init`` rows) per rank, for the same config.
"""

from __future__ import annotations

import json
from typing import Any

from .common import Context, Section, fmt, ratio, run_distributed

TITLE = "8. Start-up memory on 2 ranks: full fp32 build vs sharded build (100m)"
WORLD = 2
CASES = [(3, 1), (3, 2), (2, 1), (2, 2)]  # (ZeRO stage, EP size)


def _flags(stage: int, ep: int, sharded: bool) -> list[str]:
    return ["--preset", "100m", "--zero-stage", str(stage), "--ep-size", str(ep),
            "--set", f"parallel.sharded_build={str(sharded).lower()}"]


def _planned_mb(flags: list[str]) -> float:
    from moe_dist.run.cli import parse
    from moe_dist.plan.memory import GiB, Hardware, plan

    pl = plan(parse(flags)[1], Hardware(None, 64 * GiB, WORLD, 1, accelerator="cpu"))
    return sum(c.bytes for c in pl.cpu.consumers if c.phase == "init") / WORLD / 2**20


def measure(ctx: Context, stage: int, ep: int, sharded: bool) -> list[dict[str, Any]]:
    report = ctx.scratch("startup") / f"z{stage}-ep{ep}-{'sharded' if sharded else 'full'}.json"
    run_distributed(["-m", "tests.distributed.startup_worker", "--report", str(report),
                     *_flags(stage, ep, sharded)], WORLD, timeout=900)
    return [json.loads(report.with_name(f"{report.name}.rank{r}").read_text()) for r in range(WORLD)]


def run(ctx: Context) -> Section:
    sec = Section(TITLE)
    cases = CASES[:1] if ctx.quick else CASES
    data: dict[str, Any] = {}
    for stage, ep in cases:
        for sharded in (False, True):  # alternating: both builds of a case run back to back
            print(f"  ZeRO-{stage} EP {ep}: {'sharded' if sharded else 'full'} build", flush=True)
            data[f"zero{stage}/ep{ep}/{'sharded' if sharded else 'full'}"] = {
                "ranks": measure(ctx, stage, ep, sharded), "planned_init_mb": _planned_mb(_flags(stage, ep, sharded))}
    sec.data = data
    rows = []
    for stage, ep in cases:
        full, shard = data[f"zero{stage}/ep{ep}/full"], data[f"zero{stage}/ep{ep}/sharded"]

        def peak(d: dict, key: str) -> float:
            return max(max(r[key], r["hwm_before_build_mb"]) for r in d["ranks"])

        def inc(d: dict) -> float:
            return max(r["hwm_build_mb"] - r["rss_before_build_mb"] for r in d["ranks"])

        for name, d in (("full fp32", full), ("sharded", shard)):
            rows.append([f"ZeRO-{stage}", ep, name, fmt(peak(d, "hwm_build_mb"), 4), fmt(inc(d), 4),
                         fmt(d["planned_init_mb"], 4), ratio(d["planned_init_mb"], inc(d)),
                         fmt(peak(d, "hwm_startup_mb"), 4), max(r["local_numel"] for r in d["ranks"])])
        rows.append([f"ZeRO-{stage}", ep, "**full / sharded**",
                     f"**{ratio(peak(full, 'hwm_build_mb'), peak(shard, 'hwm_build_mb'))}**",
                     f"**{ratio(inc(full), inc(shard))}**", "", "",
                     ratio(peak(full, "hwm_startup_mb"), peak(shard, "hwm_startup_mb")), ""])
    sec.table(["ZeRO", "EP", "build", "peak RSS to model built (MiB)", "increase by the build (MiB)",
               "planned start-up term (MiB)", "planned / measured", "peak RSS to engine ready (MiB)",
               "params held after the build"], rows,
              caption="per rank, the larger of the 2 ranks; python -m benchmarks.run --only startup")
    sec.note("On this CPU-only machine the engine's fp32 optimizer states and gradients are host memory as well and "
             "set the peak to engine ready; on GPU nodes they are GPU memory and the host peak is the build's.")
    return sec
