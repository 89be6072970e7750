"""Section 7: one Muon optimizer step's Newton-Schulz on the CPU, for a preset's matrices (default ``4090``).

    python -m benchmarks.bench_muon_cpu --preset 4090 --threads 1 2 --reps 5
    python -m benchmarks.run --only muon_cpu

It calls DeepSpeed's own ``muon_update`` (``deepspeed/runtime/zero/muon/original_muon.py``: momentum
lerp, Nesterov blend, ``zeropower_via_gram_newtonschulz`` - DeepSpeed's default ``ns_method`` - and
the aspect-ratio scale) on a random fp32 gradient and momentum of every distinct Muon matrix shape of
the model (``moe_dist.plan.muon_cost.muon_matrices``), eagerly: DeepSpeed wraps these functions in
``torch.compile``, whose compilation is not what is measured here, and inductor leaves matmuls (all
the FLOPs) to the same aten kernels by default. Each shape is timed ``reps`` times (shapes
interleaved, order rotating), the median kept; one step = sum over shapes of (count x median), in
wall time and in process CPU time. Two compute dtypes: fp32, and the one DeepSpeed
picks on this CPU (``ns_compute_dtype("gram")``: fp16 where oneDNN supports it, else fp32).
The achieved FLOP rate (``muon_cost.ns_flops``, DeepSpeed's matmuls counted exactly) is what
``moe-plan`` divides by (``muon_cost.MUON_CPU_FLOPS_PER_CORE``: fp32, 1 thread, per CPU second).

With optimizer offload on a CUDA run DeepSpeed 0.19.8 copies the Muon gradients to the GPU and runs
this there (see ``moe_dist/plan/muon_cost.py``); this CPU time is what a CPU run pays.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Iterator

from .common import Context, Section, fmt, interleave, machine_info, median, spread

TITLE = "7. Muon step on the CPU: DeepSpeed's Newton-Schulz over a preset's matrices"


@contextlib.contextmanager
def eager_muon(dtype_name: str) -> Iterator:
    """DeepSpeed's ``muon_update`` with its Newton-Schulz functions un-compiled, computing in ``dtype_name``
    ('deepspeed' = DeepSpeed's own choice on this accelerator)."""
    import torch
    from deepspeed.runtime.zero.muon import original_muon as om

    saved = {k: getattr(om, k) for k in ("zeropower_via_gram_newtonschulz", "zeropower_via_newtonschulz5",
                                         "ns_compute_dtype")}
    for k in ("zeropower_via_gram_newtonschulz", "zeropower_via_newtonschulz5"):
        setattr(om, k, getattr(saved[k], "_torchdynamo_orig_callable", saved[k]))
    if dtype_name == "fp32":
        om.ns_compute_dtype = lambda ns_method="gram": torch.float32
    try:
        yield getattr(om.muon_update, "_torchdynamo_orig_callable", om.muon_update)
    finally:
        for k, v in saved.items():
            setattr(om, k, v)


def deepspeed_dtype() -> str:
    from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

    return str(ns_compute_dtype("gram")).replace("torch.", "")


def measure(preset: str, threads: list[int], reps: int, dtypes: list[str]) -> dict:
    """{(dtype, threads): {shape name: [seconds, ...]}} plus the shape list."""
    import torch

    from moe_dist.config import get_preset
    from moe_dist.plan.muon_cost import muon_matrices

    mats = muon_matrices(get_preset(preset).model)
    shapes: dict = {}   # distinct (rows, cols) -> the names of the matrices of that shape
    for x in mats:
        shapes[(x.rows, x.cols)] = "/".join(filter(None, [shapes.get((x.rows, x.cols)), x.name]))
    gen = torch.Generator().manual_seed(0)
    data = {s: (torch.randn(*s, generator=gen), torch.randn(*s, generator=gen) * 0.1) for s in shapes}
    res: dict = {}
    for dt in dtypes:
        with eager_muon(dt) as update:
            for t in threads:
                torch.set_num_threads(t)

                def one(s):
                    g, mom = data[s]

                    def go() -> dict:
                        g2, m2 = g.clone(), mom.clone()
                        c0, w0 = time.process_time(), time.perf_counter()
                        update(g2, m2, 0.95, ns_steps=5, ns_method="gram")
                        return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}
                    return go

                load0 = os.getloadavg()[0]
                raw = interleave({shapes[s]: one(s) for s in shapes}, reps=reps, warmup=1)
                runs = {k: [r["wall"] for r in v] for k, v in raw.items()}
                cpu = {k: [r["cpu"] for r in v] for k, v in raw.items()}
                label = "fp32" if dt == "fp32" else f"{deepspeed_dtype()} (DeepSpeed's)"
                res[(label, t)] = {"runs": runs, "cpu": cpu, "load": (load0, os.getloadavg()[0])}
                print(f"  {label}, {t} thread(s): " + ", ".join(f"{k} {fmt(median(v))} s" for k, v in runs.items())
                      + f" | load {load0:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
    return {"mats": mats, "shapes": shapes, "res": res}


def report(sec: Section, preset: str, out: dict) -> None:
    from moe_dist.plan.muon_cost import ns_flops

    mats, shapes, res = out["mats"], out["shapes"], out["res"]
    count = {name: sum(x.count for x in mats if (x.rows, x.cols) == s) for s, name in shapes.items()}
    rows, totals = [], []
    for (dt, t), r in res.items():
        step, cpu_s, flops = 0.0, 0.0, 0
        for s, name in shapes.items():
            sec_one, cpu_one = median(r["runs"][name]), median(r["cpu"][name])
            f = ns_flops(*s)
            step += count[name] * sec_one
            cpu_s += count[name] * cpu_one
            flops += count[name] * f
            rows.append([dt, t, f"{name} {s[0]}x{s[1]}", count[name], fmt(sec_one), spread(r["runs"][name]),
                         fmt(cpu_one), fmt(f / sec_one / 1e9)])
        totals.append([dt, t, f"{step:.1f}", f"{cpu_s:.1f}", f"{flops / 1e12:.2f}", f"{flops / step / 1e9:.1f}",
                       f"{flops / cpu_s / 1e9:.1f}", f"{r['load'][0]:.2f} -> {r['load'][1]:.2f}"])
        sec.data[f"{dt}/{t}"] = {"step_s": step, "step_cpu_s": cpu_s, "flops": flops, "flops_per_s": flops / step,
                                 "flops_per_cpu_s": flops / cpu_s, "load": r["load"], "runs": r["runs"],
                                 "cpu": r["cpu"]}
    sec.table(["dtype", "threads", "matrix (rows x cols)", "count", "median wall s", "range", "median CPU s",
               "GFLOP/s (wall)"], rows,
              caption=f"One muon_update per matrix shape ({preset} preset), median of the repetitions")
    sec.table(["dtype", "threads", "one optimizer step, wall (s)", "CPU seconds (all threads)", "TFLOP",
               "GFLOP/s (wall)", "GFLOP per CPU second", "load avg (1 min) before -> after"],
              totals, caption="One Muon step = sum over shapes of count x median (every Muon matrix of the model, "
                              "one rank, EP 1). CPU seconds = process time of all threads; on a shared machine "
                              "wall time includes waiting for a core")
    sec.note("Per core count as measured; no extrapolation to other CPUs (their cores, AVX-512 and memory "
             "bandwidth differ): run this script there. On a loaded machine the 1-thread CPU seconds are the figure "
             "least disturbed by other processes (wall time includes waiting for a core; with 2 threads each "
             "spins while the other waits, so their CPU seconds grow too). moe-plan's rate "
             "(moe_dist/plan/muon_cost.py: MUON_CPU_FLOPS_PER_CORE) is the fp32 1-thread GFLOP per CPU second.")


def run(ctx: Context) -> Section:
    sec = Section(TITLE)
    threads = sorted({1, min(2, os.cpu_count() or 1)})
    dtypes = ["fp32"] + (["deepspeed"] if deepspeed_dtype() != "float32" else [])
    out = measure("4090", threads, 3 if ctx.quick else 5, dtypes)
    report(sec, "4090", out)
    return sec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_muon_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="4090", help="model preset whose Muon matrices are timed")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="torch intra-op thread counts (default 1 "
                   "and all cores)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per shape (after one warm-up)")
    p.add_argument("--dtypes", nargs="+", default=None, help="'fp32' and/or 'deepspeed' (DeepSpeed's choice on "
                   "this CPU); default both")
    a = p.parse_args(argv)
    info = machine_info()
    print(f"{info['cpu']} | {info['cores']} | load {info['load average (1/5/15 min) at start']} | "
          f"torch {info['torch version']} | deepspeed {info['deepspeed version']}", flush=True)
    threads = a.threads or sorted({1, os.cpu_count() or 1})
    dtypes = a.dtypes or ["fp32", "deepspeed"]
    print(f"DeepSpeed's Newton-Schulz dtype on this CPU: {deepspeed_dtype()}", flush=True)
    sec = Section(TITLE)
    report(sec, a.preset, measure(a.preset, threads, a.reps, dtypes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
