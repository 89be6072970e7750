"""Section 5: offline consolidation, ``moe-consolidate`` vs ``dcp_to_torch_save``, time and peak RSS.

Each contender runs as its own process under ``benchmarks.peak_rss`` (a fresh parent per run, so
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is that run's peak) on the same world-2 checkpoints of
several model sizes (section 2's, or saved here), interleaved, median of the repetitions:

* ``moe-consolidate CKPT -o OUT.pt`` (default: checks the manifest's sizes and checksums first);
* the same with ``--no-verify-manifest`` (the work comparable to the next one; full mode only);
* ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(CKPT, OUT)``: DCP's own converter;
  it loads *every* key (optimizer states included) into memory and writes them all;
* ``python -c "import torch.distributed.checkpoint"``: the interpreter + torch floor of any of them.

Skipped with a note when ``moe-consolidate`` is not installed or does not run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from .bench_checkpoint import ensure_checkpoint
from .common import (Context, Section, dir_bytes, fmt, interleave, measure_process, median, new_figure, ratio,
                     spread)

TITLE = "5. Consolidation: moe-consolidate vs dcp_to_torch_save (time, peak RSS)"
DCP_TO_TORCH = ("import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
                "dcp_to_torch_save(sys.argv[1], sys.argv[2])")
FLOOR = "import torch, torch.distributed.checkpoint"
FLOOR_NAME = "python + torch import (floor)"
OURS, OURS_NV, DCP = "moe-consolidate", "moe-consolidate --no-verify-manifest", "dcp_to_torch_save"


def consolidate_command() -> tuple[Optional[list[str]], str]:
    """The moe-consolidate command, or None and why it cannot be used."""
    exe = shutil.which("moe-consolidate")
    if exe is None:
        venv_exe = Path(sys.executable).with_name("moe-consolidate")
        exe = str(venv_exe) if venv_exe.is_file() else None
    if exe is None:
        return None, "`moe-consolidate` is not installed (no console script on PATH or next to this Python)"
    try:
        p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"`moe-consolidate --help` did not run ({e.__class__.__name__}: {e})"
    if p.returncode != 0:
        return None, f"`moe-consolidate --help` exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"
    return [exe], "available"


def run(ctx: Context) -> Section:
    sec = Section(TITLE)
    cmd, why = consolidate_command()
    if cmd is None:
        sec.note(f"skipped: {why}. Install the package (pip install -e .) once moe_dist/export/consolidate.py exists.")
        return sec
    sizes = ["tiny", "30m"] if ctx.quick else ["tiny", "30m", "100m"]
    reps = 3 if ctx.quick else 5
    work = ctx.scratch("consolidate")
    results: dict[str, dict[str, Any]] = {}
    for size in sizes:
        ckpt = ensure_checkpoint(ctx, size)
        outs = {OURS: work / f"{size}-ours.pt", OURS_NV: work / f"{size}-ours-noverify.pt",
                DCP: work / f"{size}-dcp.pt"}
        commands = {
            OURS: [*cmd, str(ckpt), "-o", str(outs[OURS]), "--force", "-q"],
            OURS_NV: [*cmd, str(ckpt), "-o", str(outs[OURS_NV]), "--force", "-q", "--no-verify-manifest"],
            DCP: [sys.executable, "-c", DCP_TO_TORCH, str(ckpt), str(outs[DCP])],
            FLOOR_NAME: [sys.executable, "-c", FLOOR],
        }
        if ctx.quick:  # one process less per repetition; the manifest check is measured in section 2
            commands.pop(OURS_NV)
            outs.pop(OURS_NV)
        measured: dict[str, list[dict[str, Any]]] = {n: [] for n in commands}

        def contender(name: str) -> Any:
            def go() -> float:
                out = outs.get(name)
                if out is not None and out.exists():
                    out.unlink()  # dcp_to_torch_save has no --force; every contender writes afresh
                r = measure_process(commands[name], timeout=1800)
                measured[name].append(r)
                return r["seconds"]
            return go

        print(f"  {size}: {reps} interleaved repetitions of {len(commands)} commands", flush=True)
        interleave({n: contender(n) for n in commands}, reps)
        results[size] = {"checkpoint_mb": dir_bytes(ckpt) / 1e6,
                         "model_mb": sum(p.stat().st_size for p in ckpt.glob("*.distcp")) / 1e6,
                         "out_mb": {n: dir_bytes(o) / 1e6 for n, o in outs.items() if o.exists()},
                         "seconds": {n: [r["seconds"] for r in rs] for n, rs in measured.items()},
                         "peak_rss_mb": {n: [r["peak_rss_mb"] for r in rs] for n, rs in measured.items()}}
        for o in outs.values():
            o.unlink(missing_ok=True)
    sec.data = results
    rows, ratio_rows = [], []
    for size, r in results.items():
        floor = median(r["peak_rss_mb"][FLOOR_NAME])
        t_floor = median(r["seconds"][FLOOR_NAME])
        for name in r["seconds"]:
            t, rss = median(r["seconds"][name]), median(r["peak_rss_mb"][name])
            rows.append([size, fmt(r["checkpoint_mb"]), name, fmt(r["out_mb"].get(name)), fmt(t),
                         spread(r["seconds"][name]), fmt(t - t_floor), fmt(rss), fmt(rss - floor)])
        sec_m = {n: median(v) for n, v in r["seconds"].items()}
        rss_m = {n: median(v) for n, v in r["peak_rss_mb"].items()}
        row = [size, fmt(r["checkpoint_mb"])]
        for ours in (OURS, OURS_NV):
            if ours in sec_m:
                row += [ratio(sec_m[DCP], sec_m[ours]), ratio(sec_m[DCP] - t_floor, sec_m[ours] - t_floor)]
        ratio_rows.append(row + [ratio(rss_m[DCP] - floor, rss_m[OURS] - floor), ratio(rss_m[DCP], rss_m[OURS])])
    sec.table(["size", "checkpoint MB", "command", "output MB", "time s", "time range", "time above floor s",
               "peak RSS MB", "RSS above floor MB"], rows,
              caption=f"median of {reps} interleaved repetitions; checkpoint = world-2 CheckpointManager checkpoint "
                      "(weights + optimizer states)")
    variants = [o for o in (OURS, OURS_NV) if o in next(iter(results.values()))["seconds"]]
    time_cols = [c for o in variants for c in (f"time: dcp_to_torch_save / {o}", "same, above floor")]
    sec.table(["size", "checkpoint MB", *time_cols, f"RSS above floor: dcp_to_torch_save / {OURS}",
               f"peak RSS: dcp_to_torch_save / {OURS}"], ratio_rows,
              caption="ratios (> 1: moe-consolidate is faster / smaller)")
    sec.note("The outputs differ in content: moe-consolidate writes the model weights only ({step, "
             "model_state_dict, config, ...}); dcp_to_torch_save writes every key of the checkpoint, optimizer "
             "states included, which is why its output MB and its memory grow with the whole checkpoint. "
             "'floor' = a Python that only imports torch.distributed.checkpoint (its time and peak RSS are in "
             "every contender's figures; 'above floor' subtracts them, and its ratio shows '-' when a difference fell "
             "inside the noise).")
    fig, ax = new_figure()
    xs = [r["checkpoint_mb"] for r in results.values()]
    for name in next(iter(results.values()))["peak_rss_mb"]:
        ax.plot(xs, [median(r["peak_rss_mb"][name]) for r in results.values()], marker="o", label=name)
    ax.set_xlabel("checkpoint size on disk (MB)")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("consolidation peak memory vs checkpoint size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    sec.plot(fig, ctx.out, "consolidate_peak_rss.png", "peak RSS vs checkpoint size")
    return sec
