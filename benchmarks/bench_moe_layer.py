"""Section 1: one MoE layer, forward + backward, in this process on one rank.

Contenders (d_model 256, d_ff 512, 8 experts, top-2, the same SwiGLU expert type and weights):

* ``ours``: ``MoEFeedForward`` with the ``LocalDispatcher``, dropless (``capacity_factor=None``);
* ``DeepSpeed cf=1``: ``deepspeed.moe.layer.MoE`` with its default capacity factor (1.0), which
  drops the assignments that overflow an expert's capacity;
* ``DeepSpeed dropless``: the same layer with ``drop_tokens=False`` (capacity = the busiest
  expert's load, so nothing is dropped);
* ``dense``: one SwiGLU MLP of width top_k * d_ff, the same active FLOPs per token as the experts:
  the compute limit a dispatcher can approach.

DeepSpeed's layer needs a process group and its expert-parallel groups: a 1-rank gloo group
(``deepspeed.init_distributed``) with ``ep_size=1``. Both MoE layers get the same router and
expert weights, so they route alike (DeepSpeed samples the 2nd expert with Gumbel noise; ours
adds Gaussian router noise: each layer's default training behaviour).

Run alone: ``python -m benchmarks.bench_moe_layer [--quick]``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch

from .common import Context, Section, fmt, grouped_bars, interleave, median, new_figure, ratio, run_alone

TITLE = "1. MoE layer: forward + backward throughput (one process)"
D_MODEL, D_FF, EXPERTS, TOP_K = 256, 512, 8, 2


def _init_single_rank_group() -> dict[str, Any]:
    """A 1-rank gloo group for DeepSpeed's MoE layer; returns the env it replaced (restored after)."""
    import deepspeed

    from tests.distributed.harness import free_port

    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return saved


def _close_group(saved: dict[str, Any]) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def build_layers() -> dict[str, torch.nn.Module]:
    from deepspeed.moe.layer import MoE

    from moe_dist.config import ModelConfig
    from moe_dist.model.moe import Expert, MoEFeedForward

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D_MODEL, d_ff=D_FF, num_experts=EXPERTS, top_k=TOP_K, expert_type="swiglu")
    ours = MoEFeedForward(cfg)  # LocalDispatcher, capacity_factor None (dropless)
    layers: dict[str, torch.nn.Module] = {"ours": ours}
    for name, drop in (("DeepSpeed cf=1", True), ("DeepSpeed dropless", False)):
        ds = MoE(D_MODEL, Expert(D_MODEL, D_FF, "swiglu"), num_experts=EXPERTS, ep_size=1, k=TOP_K,
                 drop_tokens=drop)
        ds.set_deepspeed_parallelism()
        with torch.no_grad():
            ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
            for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
                for m in ("w_gate", "w_up", "w_down"):  # ours are stacked: row e is expert e
                    getattr(expert, m).weight.copy_(getattr(ours.experts, m)[e])
        layers[name] = ds
    layers["dense"] = Expert(D_MODEL, TOP_K * D_FF, "swiglu")
    for layer in layers.values():
        layer.train()
    return layers


def _step_fn(name: str, layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    """One forward + backward (input gradient included, as inside a network)."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        if isinstance(out, tuple):  # ours: (y, aux); DeepSpeed: (y, l_aux, exp_counts)
            y, aux = out[0], out[1]
            loss = (y * gy).sum() + aux
        else:
            loss = (out * gy).sum()
        loss.backward()

    return step


def _once(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(tokens_list: list[int], reps: int, min_seconds: float) -> dict[int, dict[str, Any]]:
    layers = build_layers()
    dropped: dict[str, list[float]] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            idx = output[3]  # sparse routes: [k, S] expert ids, -1 where the capacity limit dropped it
            dropped.setdefault(name, []).append(float((idx < 0).sum()) / idx.numel())
        return hook

    for name, layer in layers.items():
        if name.startswith("DeepSpeed"):
            layer.deepspeed_moe.gate.register_forward_hook(hook_for(name))
    results: dict[int, dict[str, Any]] = {}
    for T in tokens_list:
        g = torch.Generator().manual_seed(T)
        x = torch.randn(1, T, D_MODEL, generator=g).requires_grad_(True)  # [B=1, T, D]
        gy = torch.randn(1, T, D_MODEL, generator=g)
        steps = {name: _step_fn(name, layer, x, gy) for name, layer in layers.items()}
        for fn in steps.values():  # warm-up: allocator, DeepSpeed's lazy set-up
            fn()
        one = min(_once(steps["ours"]) for _ in range(2))
        inner = max(1, round(min_seconds / max(one, 1e-6)))
        dropped.clear()

        def repeat(fn: Callable[[], None]) -> Callable[[], float]:
            def run() -> float:
                t = time.perf_counter()
                for _ in range(inner):
                    fn()
                return (time.perf_counter() - t) / inner
            return run

        times = interleave({name: repeat(fn) for name, fn in steps.items()}, reps)
        ours_layer = layers["ours"]
        results[T] = {"inner": inner, "seconds": times,
                      "tokens_per_s": {n: T / median(ts) for n, ts in times.items()},
                      "dropped_fraction": {n: sum(v) / len(v) for n, v in dropped.items()},
                      "ours_dropped": int(ours_layer.last_dropped)}
    return results


def run(ctx: Context) -> Section:
    sec = Section(TITLE)
    tokens_list = [1024, 4096] if ctx.quick else [1024, 4096, 16384]
    reps, min_seconds = (5, 0.25) if ctx.quick else (11, 0.6)
    threads = torch.get_num_threads()
    # One intra-op thread: the machine is shared, and 2 OpenMP threads on 2 busy cores measure
    # scheduling more than the layers (the multi-rank sections run 1 thread per rank as well).
    torch.set_num_threads(1)
    from moe_dist.run.host_memory import keep_freed_host_memory, restore_glibc_defaults

    saved = _init_single_rank_group()
    try:
        res = measure(tokens_list, reps, min_seconds)
        # Again under the host-memory policy moe_dist's CPU training runs use (run/host_memory.py),
        # then back to glibc's defaults for the sections after this one.
        policy = keep_freed_host_memory()
        try:
            kept = measure(tokens_list, reps, min_seconds)
        finally:
            restore_glibc_defaults()
    finally:
        _close_group(saved)
        torch.set_num_threads(threads)
    sec.data = {"glibc_default": {str(T): r for T, r in res.items()},
                "freed_blocks_kept": {str(T): r for T, r in kept.items()}, "policy": policy}
    names = list(next(iter(res.values()))["tokens_per_s"])
    rows = []
    for T, r in res.items():
        ours = r["tokens_per_s"]["ours"]
        for n in names:
            tps = r["tokens_per_s"][n]
            secs = r["seconds"][n]
            drop = r["dropped_fraction"].get(n, 0.0 if n == "ours" else None)
            rows.append([f"{T:,}", n, fmt(tps), f"{fmt(T / max(secs))}-{fmt(T / min(secs))}",
                         "-" if drop is None else f"{100 * drop:.2f}%",
                         "1.00x" if n == "ours" else ratio(ours, tps)])
    sec.table(["tokens", "layer", "tokens/s (median)", "tokens/s range", "dropped assignments", "ours / this"],
              rows, caption=f"forward+backward, d_model {D_MODEL}, d_ff {D_FF}, {EXPERTS} experts, top-{TOP_K}; "
                            f"median of {reps} interleaved repetitions, glibc's default allocator")
    sec.table(["host memory", "tokens", "ours / DeepSpeed cf=1", "ours / DeepSpeed dropless",
               "ours / dense (compute limit)"],
              [[mode, f"{T:,}", ratio(r["tokens_per_s"]["ours"], r["tokens_per_s"]["DeepSpeed cf=1"]),
                ratio(r["tokens_per_s"]["ours"], r["tokens_per_s"]["DeepSpeed dropless"]),
                ratio(r["tokens_per_s"]["ours"], r["tokens_per_s"]["dense"])]
               for mode, rs in (("glibc default", res), ("freed blocks kept", kept)) for T, r in rs.items()],
              caption="ratios of tokens/s (> 1: ours is faster); 'freed blocks kept' is the second pass, under "
                      f"moe_dist's CPU host-memory policy: {policy}")
    inner = ", ".join(f"{r['inner']} at {T:,} tokens" for T, r in res.items())
    sec.note(f"torch intra-op threads: 1 (of {threads}). One repetition of a contender = back-to-back steps "
             f"({inner}), timed together and divided. Ours drops nothing by construction "
             f"(last_dropped = {max(r['ours_dropped'] for r in res.values())}). DeepSpeed cf=1 computes on "
             "capacity-padded buffers (8 x ceil(2T/8) rows) and drops overflow; dropless pads to the busiest expert.")
    fig, ax = new_figure()
    grouped_bars(ax, [f"{T:,} tokens" for T in res], {n: [res[T]["tokens_per_s"][n] for T in res] for n in names},
                 "tokens/s (forward+backward)", "MoE layer throughput, higher is better")
    sec.plot(fig, ctx.out, "moe_layer_tokens_per_s.png", "MoE layer tokens/s")
    return sec


if __name__ == "__main__":
    run_alone(run, __doc__, "bench_moe_layer")
