"""Section 3: how long training stalls for a checkpoint, synchronous vs ``--async-save``.

``benchmarks.ckpt_worker --mode stall`` trains on 2 ranks, first some steps without checkpoints
(the baseline; its first two steps left out), then blocks of steps that each end with a save,
alternating a synchronous ``CheckpointManager`` and one with ``checkpoint.async_save`` on the same
engine, so both are measured side by side under the same load. Each step's training part
(``train_step``) and checkpoint part (every manager's ``after_step`` + the save) are timed apart:

* **stall** = the checkpoint part of a step that saves - that of a normal step (one that neither
  saves nor follows a save): the time the loop is blocked (for async: staging the copy);
* **step with save - normal step**: the brief's definition, whole steps; on a shared machine the
  step time itself varies by more than a stall, so this one is noisy;
* **publish s / ckpt**: extra checkpoint-part time of the other steps of the block (an async save
  is published, manifest checksums included, from a later step's ``after_step``); **blocked** = stall
  + publish, the loop time one checkpoint takes;
* **train step after save / baseline**: training-part time of the steps following a save, relative
  to the baseline (a background write competes with them for the CPUs).

The manager's own ``checkpoint_log.jsonl`` (``stall_s``, ``total_s``) is shown beside. The async
contender runs only if the code acts on ``checkpoint.async_save``; otherwise the row says so
and nothing is estimated in its place.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from .bench_checkpoint import WORLD, _worker, remember_checkpoint
from .common import Context, Section, fmt, median, new_figure, ratio

TITLE = "3. Training stall per checkpoint: synchronous vs async save"


def async_support() -> tuple[bool, str]:
    """Whether any code path acts on ``checkpoint.async_save`` (beyond parsing it)."""
    import moe_dist.checkpoint.manager as manager
    import moe_dist.train as train
    import moe_dist.run.trainer as trainer

    users = [m.__name__ for m in (manager, trainer, train) if "async_save" in inspect.getsource(m)]
    if users:
        return True, f"checkpoint.async_save is acted on in {', '.join(users)}"
    return False, ("not available: `--async-save` / checkpoint.async_save is parsed (moe_dist/run/cli.py, "
                   "moe_dist/config.py) but no code in CheckpointManager, the trainer or train.py reads it, so "
                   "every save is synchronous")


def stall_stats(stall: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per mode: stall, whole-step difference, publish time, slowdown of the step after a save.

    Normal steps: every step that neither saves nor directly follows a save, the first two left
    out (allocation, DeepSpeed's lazy set-up); they are spread over the whole run, so they see
    the same machine load as the saving steps.
    """
    rows = stall["rows"][2:]
    normal, after = [], {m: [] for m in stall["modes"]}  # after[m]: steps directly following an m-save
    later = {m: [] for m in stall["modes"]}              # every non-saving step after an m-save
    previous, current = None, None
    for r in rows:
        if r["saved"] is None:
            (after[previous] if previous else normal).append(r)
            if current:
                later[current].append(r)
        else:
            current = r["saved"]
        previous = r["saved"]
    hook, train = median([r["hook_s"] for r in normal]), median([r["train_s"] for r in normal])
    step = median([r["hook_s"] + r["train_s"] for r in normal])
    out = {}
    for mode in stall["modes"]:
        saves = [r for r in rows if r["saved"] == mode]
        log = stall["manager_log"].get(mode) or []
        out[mode] = {"normal_step": step, "save_step": median([r["hook_s"] + r["train_s"] for r in saves]),
                     "step_diff": median([r["hook_s"] + r["train_s"] for r in saves]) - step,
                     "stall": median([r["hook_s"] for r in saves]) - hook,
                     "publish": sum(r["hook_s"] - hook for r in later[mode]) / max(len(saves), 1),
                     "train_after": median([r["train_s"] for r in after[mode]]) / train,
                     "manager_stall": median([x["stall_s"] for x in log]) if log else float("nan"),
                     "manager_total": median([x["total_s"] for x in log]) if log else float("nan"),
                     "saves": len(saves), "normal_steps": len(normal)}
    return out


def run(ctx: Context) -> Section:
    sec = Section(TITLE)
    supported, why = async_support()
    # Steps of 30m take ~3 s here (Muon), of 100m ~15 s: enough saves fit the hour with 30m only.
    size = "14m" if ctx.quick else "30m"
    every, baseline, blocks = (3, 4, 4) if ctx.quick else (4, 6, 10)
    print(f"  {size}: {baseline} steps, then {blocks} blocks of {every} steps ending in a save "
          f"({'sync and async alternating' if supported else 'sync only'})", flush=True)
    res = _worker(ctx, size, "stall", WORLD, 1, "--baseline-steps", str(baseline), "--blocks", str(blocks),
                  "--save-every", str(every), *(["--async-save"] if supported else []))
    sec.data = res
    remember_checkpoint(ctx, size, Path(res["stall"]["checkpoint"]))  # the sync manager's last: for section 4
    stats = stall_stats(res["stall"])
    rows = []
    for mode, r in stats.items():
        rows.append([size, mode, fmt(r["normal_step"]), fmt(r["step_diff"]), fmt(r["stall"]), fmt(r["publish"]),
                     fmt(r["stall"] + r["publish"]), ratio(r["stall"], r["normal_step"]),
                     ratio(r["train_after"], 1.0), fmt(r["manager_stall"]), fmt(r["manager_total"]),
                     f"{r['saves']} / {r['normal_steps']}"])
    if not supported:
        rows.append([size, "async", *["-"] * 9, why.split(":")[0]])
    sec.table(["size", "save", "normal step s", "step with save - normal s", "stall s", "publish s / ckpt",
               "blocked s / ckpt", "stall / normal step", "train step after save / normal", "manager stall_s",
               "manager total_s", "saves / normal steps"], rows,
              caption=f"2 ranks, ZeRO-2, global batch 6 x 32 tokens; {baseline} steps without checkpoints, then "
                      f"{blocks} blocks of {every} steps each ending in a save; medians; blocked = stall + publish")
    if supported:
        s_, a = stats["sync"], stats["async"]
        sec.note(f"async / sync: stall {ratio(a['stall'], s_['stall'])}, blocked per checkpoint (stall + publish) "
                 f"{ratio(a['stall'] + a['publish'], s_['stall'] + s_['publish'])}. {why}. 'normal' steps neither "
                 "save nor follow a save; they are spread over the run, between the saving steps.")
    else:
        sec.note(f"async save: {why}.")
    fig, ax = new_figure()
    labels = list(stats)
    stalls = [stats[m]["stall"] for m in labels]
    ax.bar(labels, stalls, label="stall (checkpoint part of the saving step)")
    ax.bar(labels, [stats[m]["publish"] for m in labels], bottom=stalls, label="publish (later steps)")
    if not supported:
        ax.text(0.98, 0.95, "async save: not available", transform=ax.transAxes, ha="right", va="top")
    ax.set_ylim(0, 1.4 * max(stats[m]["stall"] + max(stats[m]["publish"], 0.0) for m in labels))
    ax.set_ylabel("seconds per checkpoint")
    ax.set_title(f"{size}: training loop blocked per checkpoint")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    sec.plot(fig, ctx.out, "async_save_stall.png", "stall per checkpoint")
    return sec
