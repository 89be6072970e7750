"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--out DIR] [--only SECTION ...]``.

Sections (one module each; ``--only`` takes these names):

  moe_layer    MoE layer fwd+bwd tokens/s: ours vs DeepSpeed's MoE vs a dense MLP   (bench_moe_layer)
  checkpoint   full-state save/load on 2 ranks: ours vs DeepSpeed vs torch.save vs disk (bench_checkpoint)
  async_save   training stall per checkpoint, sync vs --async-save                  (bench_async_save)
  reshard      a world-2 checkpoint loaded on 1, 2 and 3 ranks                       (bench_reshard)
  consolidate  moe-consolidate vs dcp_to_torch_save: time and peak RSS               (bench_consolidate)
  train        training tokens/s at ZeRO-1/2/3 x EP 1/2 on 2 ranks                   (bench_train)
  train_engines  DeepSpeed ZeRO-2 vs FSDP2: tokens/s, checkpoint save/load, EP 1/2   (bench_engines)
  muon_cpu     one Muon step's Newton-Schulz on the CPU for the 4090 preset's matrices  (bench_muon_cpu)
  data         token store: preparation tokens/s (1 vs 2 procs), start-up + RSS vs corpus size (bench_data)
  startup      start-up peak RSS on 2 ranks (100m): full fp32 build vs sharded build      (bench_startup)
  train_step   one step in one process: moe_dist (ZeRO-1/2/3, FSDP2) vs a bare loop; grouped vs loop vs
               the seed's dispatch at 8 and 64 experts; --compile; aten ops, host syncs  (bench_train_step)

Writes ``results.md`` (a dated header describing the machine, then every section's tables),
``results.json`` (the raw measurements) and the PNG plots into ``--out`` (default
``benchmarks/results/<today>``), and prints the tables. ``--quick`` uses smaller sizes and fewer
repetitions (meant to finish in under 10 minutes on 2 CPU cores; the full run in under an hour).
A section that fails is reported as failed in results.md and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .common import REPO_ROOT, Context, Section, machine_info

SECTIONS = {
    "moe_layer": "bench_moe_layer",
    "checkpoint": "bench_checkpoint",
    "async_save": "bench_async_save",
    "reshard": "bench_reshard",
    "consolidate": "bench_consolidate",
    "train": "bench_train",
    "train_engines": "bench_engines",
    "muon_cpu": "bench_muon_cpu",
    "data": "bench_data",
    "data_prep": "bench_data_prep",
    "data_startup": "bench_data_startup",
    "startup": "bench_startup",
    "train_step": "bench_train_step",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="sections: " + ", ".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="small sizes, fewer repetitions (< 10 min on 2 cores)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results/<YYYY-MM-DD>)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                   help=f"run only these sections: {', '.join(SECTIONS)}")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder for checkpoints and runs (default: a temporary folder, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    return p.parse_args(argv)


def header(args: argparse.Namespace, info: dict[str, str], argv: list[str]) -> str:
    lines = [f"# moe_dist benchmarks, {info['date'].split()[0]}", "",
             f"Mode: **{'quick' if args.quick else 'full'}**. Command: `python -m benchmarks.run {' '.join(argv)}`",
             "", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    threads = os.environ.get("OMP_NUM_THREADS", "1 (set by tests.distributed.harness)")
    lines += ["", f"Multi-rank sections start every rank with OMP_NUM_THREADS={threads}; section 1 runs one "
              "intra-op thread.", "",
              "Every number below was measured in this run. Contenders are interleaved (the order rotates each "
              "repetition) and reported as medians; ratios compare contenders of the same run. The machine is "
              "shared, so absolute figures are noisy; the ratios are the result.", ""]
    return "\n".join(lines)


def write_results(out: Path, head: str, sections: list[Section], footer: str = "") -> None:
    body = "\n".join(s.markdown() for s in sections)
    (out / "results.md").write_text(head + "\n" + body + ("\n" + footer if footer else ""))
    (out / "results.json").write_text(json.dumps({s.title: s.data for s in sections}, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = args.out or REPO_ROOT / "benchmarks" / "results" / time.strftime("%Y-%m-%d")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="moe_dist_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(quick=args.quick, out=out, work=work)
    info = machine_info()
    head = header(args, info, argv)
    print(head, flush=True)
    done: list[Section] = []
    timings: list[str] = []
    failed = []
    try:
        for name in args.only or list(SECTIONS):
            module = importlib.import_module(f"benchmarks.{SECTIONS[name]}")
            print(f"\n=== {module.TITLE}", flush=True)
            t0 = time.perf_counter()
            try:
                sec = module.run(ctx)
            except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
                sec = Section(module.TITLE)
                tail = "".join(traceback.format_exception(e))[-4000:]
                sec.note(f"**FAILED** ({e.__class__.__name__}); traceback tail:\n\n```\n{tail}\n```")
                failed.append(name)
            seconds = time.perf_counter() - t0
            timings.append(f"| {name} | {seconds:.0f} |")
            done.append(sec)
            print(f"=== {name}: {seconds:.0f} s", flush=True)
            write_results(out, head, done)
    finally:
        if not args.keep_work and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    footer = "\n".join(["## Wall time", "", "| section | seconds |", "|---|---|", *timings,
                        f"| **total** | **{total:.0f}** |", ""])
    write_results(out, head, done, footer)
    print(f"\nwrote {out / 'results.md'} ({total:.0f} s in all)" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
