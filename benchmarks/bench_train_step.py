"""Section train_step: tokens/s of one training step, moe_dist against a bare PyTorch loop, in one process.

Every row is one ``benchmarks.train_step_worker`` process (world 1, one intra-op thread): it builds
moe_dist's step from ``moe-train`` flags and a bare loop of the same model, and steps them in turn,
the order rotating each round (see the worker's docstring). Ratios are per round, then median and
range, so each compares contenders that ran seconds apart on the same machine.

Tables:

1. engine overhead: moe_dist under DeepSpeed ZeRO-1/2/3 and FSDP2 over the bare loop (AdamW in both,
   so the maths is the same), at the ``100m`` preset, split in two: moe_dist over its engine stepped
   alone (the trainer's own cost) and the engine alone over the bare loop (DeepSpeed's or FSDP2's);
2. experts: the bare model with grouped experts against the loop kernel and against the seed
   trainer's dispatch (a boolean mask and an ``.any()`` per expert), at 8 and 64 experts;
3. compile: moe_dist (ZeRO-2) with ``--compile`` over the bare eager loop, beside eager moe_dist;

plus aten ops and host syncs per step of every contender. The MoE layer against DeepSpeed's ``MoE``
is section ``moe_layer`` (16K tokens in the full run).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

from .common import REPO_ROOT, Context, Section, fmt, run_alone

TITLE = "Training step: moe_dist vs a bare PyTorch loop (one process, stepped in turn)"
DS = {"zero1": ["--deepspeed-config", str(REPO_ROOT / "launch_configs" / "cpu_zero2.json"), "--zero-stage", "1"],
      "zero2": ["--deepspeed-config", str(REPO_ROOT / "launch_configs" / "cpu_zero2.json"), "--zero-stage", "2"],
      "zero3": ["--deepspeed-config", str(REPO_ROOT / "launch_configs" / "cpu_zero2.json"), "--zero-stage", "3"],
      "fsdp2": ["--engine", "fsdp2"]}


def _worker(ctx: Context, name: str, flags: list[str], contenders: str, rounds: int, warmup: int,
            dynamo: bool = False) -> dict[str, Any]:
    out = ctx.scratch("train_step") / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.train_step_worker", "--json", str(out), "--rounds", str(rounds),
           "--warmup", str(warmup), "--contenders", contenders, "--",
           *flags, "--set", "train.eval_every=0", "--output-dir", str(ctx.scratch("train_step", name))]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="0" if dynamo else "1")
    print(f"  {name}: {' '.join(flags)}", flush=True)
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"train_step worker {name} failed:\n" + "\n".join((res.stdout + res.stderr).splitlines()[-25:]))
    return json.loads(out.read_text())


def _ratio(r: dict[str, Any], n: str, over: str = "bare") -> str:
    """tokens/s of contender ``n`` over ``over``'s, per round (the same round's steps): median (range)."""
    v = [b / a for a, b in zip(r["seconds"][n], r["seconds"][over])]
    return f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})"


def run(ctx: Context) -> Section:
    sec = Section(TITLE)
    rounds, warmup = (3, 1) if ctx.quick else (7, 2)
    size = ["--preset", "tiny"] if ctx.quick else ["--preset", "100m"]
    batch = ["--global-batch-size", "4", "--set", "train.micro_batch_size=4"]
    adamw = ["--set", "train.optimizer=adamw"]
    res: dict[str, Any] = {}

    rows = []
    big = ["--global-batch-size", "16", "--set", "train.micro_batch_size=16"]
    # 16 sequences as 4 micro-batches of 4: the engine's per-step work is paid once per optimizer step
    # (ZeRO-1 reduces at the accumulation boundary only; the bare loop accumulates the same way).
    accum = ["--global-batch-size", "16", "--set", "train.micro_batch_size=4"]
    cases = ([(eng, flags, batch) for eng, flags in DS.items()] + [(eng, DS[eng], big) for eng in ("zero2", "fsdp2")]
             + [("zero1", DS["zero1"], accum)])
    for eng, flags, b in cases:
        micro = b[3].rpartition("=")[2]
        name = f"engine-{eng}-gb{b[1]}-mb{micro}"
        r = res[name] = _worker(ctx, name, [*size, *flags, *adamw, *b], "moe,engine,bare", rounds, warmup)
        seqs = b[1] if micro == b[1] else f"{b[1]} ({int(b[1]) // int(micro)} x {micro})"
        rows.append([eng, seqs, fmt(r["tokens_per_s"]["moe"]), fmt(r["tokens_per_s"]["bare"]), _ratio(r, "moe"),
                     _ratio(r, "moe", "engine"), _ratio(r, "engine"),
                     f"{r['aten_ops']['moe']} / {r['aten_ops']['bare']}",
                     f"{r['host_syncs']['moe']} / {r['host_syncs']['bare']}"])
    sec.table(["engine", "sequences per step", "moe_dist tokens/s", "bare tokens/s", "moe_dist / bare (median, range)",
               "moe_dist / engine alone", "engine alone / bare",
               "aten ops per step (moe_dist / bare)", "host syncs per step (moe_dist / bare)"], rows,
              caption=f"{size[1]}, fp32 on 1 CPU process, fused AdamW clipped at 1.0 in both, sequences of the "
                      f"preset's length, one micro-batch per step unless shown as accumulation, {rounds} rounds")

    rows = []
    from moe_dist.config import get_preset

    base = get_preset(size[1]).model
    for experts in (8, 64):
        # Finer experts at the same expert parameter count (E x d_ff fixed), as DeepSeek-style models do:
        # 64 experts of the preset's full width would not fit beside the engine's copies in 24 GB.
        d_ff = base.d_ff * base.num_experts // experts
        flags = [*size, *DS["zero2"], *adamw, *batch, "--set", f"model.num_experts={experts}",
                 "--set", f"model.d_ff={d_ff}"]
        r = res[f"experts-{experts}"] = _worker(ctx, f"experts-{experts}", flags, "bare,bare_loop,bare_seed",
                                                rounds, warmup)
        t = r["tokens_per_s"]
        rows.append([f"{experts} x d_ff {d_ff}", fmt(t["bare"]), fmt(t["bare_loop"]), fmt(t["bare_seed"]),
                     _ratio(r, "bare", "bare_loop"), _ratio(r, "bare", "bare_seed"),
                     " / ".join(str(r["aten_ops"][n]) for n in ("bare", "bare_loop", "bare_seed")),
                     " / ".join(str(r["host_syncs"][n]) for n in ("bare", "bare_loop", "bare_seed"))])
    sec.table(["experts", "grouped tokens/s", "loop tokens/s", "seed dispatch tokens/s", "grouped / loop",
               "grouped / seed", "aten ops (grouped / loop / seed)", "host syncs (grouped / loop / seed)"], rows,
              caption="the bare model (no engine), top-2 routing; ratios of tokens/s, median over rounds")

    flags = ["--preset", "tiny", *DS["zero2"], *adamw, *batch]
    r = res["compile"] = _worker(ctx, "compile", [*flags, "--compile"], "moe,bare", rounds, warmup + 1, dynamo=True)
    e = res["eager"] = _worker(ctx, "eager", flags, "moe,bare", rounds, warmup, dynamo=True)
    sec.table(["moe_dist ZeRO-2", "tokens/s", "moe_dist / bare eager", "first steps (s)"],
              [["--compile", fmt(r["tokens_per_s"]["moe"]), _ratio(r, "moe"), f"{r['first_s']['moe']:.1f}"],
               ["eager", fmt(e["tokens_per_s"]["moe"]), _ratio(e, "moe"), f"{e['first_s']['moe']:.1f}"]],
              caption="tiny preset, fp32 on CPU; 'first steps' is the warm-up rounds' time, compilation included")
    sec.note("Host syncs are counted by moe_dist.host_syncs on the CPU, where every read of a tensor's value "
             "counts, including torch.optim.AdamW's per-parameter read of its CPU step counter (not a device "
             "sync on a GPU). Aten ops are every op dispatched in one step.")
    sec.data = res
    return sec


if __name__ == "__main__":
    print(run_alone(run, __doc__, "bench_train_step"))
