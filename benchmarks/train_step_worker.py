"""One process, one model, contenders stepped in turn: moe_dist's training step against a bare loop.

``python -m benchmarks.train_step_worker --json OUT [--rounds N] [--contenders moe,bare,...] -- <moe-train flags>``

The flags build moe_dist's run exactly as ``moe_dist/train.py`` would on one process (engine, ZeRO
stage, precision, kernel, compile), and its ``Trainer.train_step`` is contender ``moe``: the LR
schedule, every micro-batch's forward/backward through the engine, the optimizer step, the metrics
read-back. The other contenders share one bare copy of the same model (``model.build``, the same
seed) and one fused ``torch.optim.AdamW`` (clipping at ``train.grad_clip`` as moe_dist does), and step
the same micro-batches with plain PyTorch, no engine:

* ``engine``: moe_dist's engine (DeepSpeed or FSDP2, as built for ``moe``) stepped the bare way:
  forward, backward and step of the same micro-batches, without the trainer around them (no LR
  schedule, metrics, guard or heartbeat). ``moe / engine`` is moe_dist's own cost, ``engine / bare``
  the engine library's;
* ``bare``: the model as moe_dist computes it (grouped experts where they run);
* ``bare_loop``: the experts' loop kernel (one matmul chain per expert);
* ``bare_seed``: the seed trainer's dispatch, as its description reads (for each expert, a boolean
  mask of the tokens routed to it, an ``.any()`` test read back on the host, a gather, the expert, a
  masked add), written here from that description.

Each round runs every contender once, in an order that rotates every round, so no contender always
goes first on a noisy machine; the first ``--warmup`` rounds (compilation, allocator, DeepSpeed's
lazy set-up) are timed apart as ``first_s``. Ratios are taken within a round and reported as median
and range. One step of each contender is also counted: aten ops (a dispatch mode) and host syncs
(``moe_dist.host_syncs``). On CUDA every timed step ends with a synchronize.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class SeedDispatcher:
    """The seed trainer's dispatch: a boolean mask and a host-side ``.any()`` per expert."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor, experts: Any,
                 capacity_factor: Any, drop_base: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        if drop_base is not None:
            raise ValueError("the seed-dispatch contender has no expert dropout; run it with model.dropout=0")
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            hit_TK = topk_idx_TK == e
            rows_T = hit_TK.any(dim=-1)
            if not rows_T.any():  # the host sync the seed pays per expert
                continue
            x_ND = x_TD[rows_T]
            up = x_ND @ experts.w_up[e].T
            h = F.silu(x_ND @ experts.w_gate[e].T) * up if experts.w_gate is not None else F.silu(up)
            w_N = (topk_w_TK * hit_TK).sum(dim=-1)[rows_T]
            y_TD[rows_T] += w_N.unsqueeze(1).to(h.dtype) * (h @ experts.w_down[e].T)
        return y_TD, torch.zeros((), dtype=torch.long, device=x_TD.device)


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(flags: list[str]) -> dict[str, Any]:
    """moe_dist's trainer and a bare copy of its model, from ``moe-train`` flags (one process)."""
    from moe_dist import model as lm
    from moe_dist.data.loader import build_data
    from moe_dist.data.sampler import GlobalCursorSampler
    from moe_dist.parallel.runtime import build_engine, init_runtime
    from moe_dist.run.cli import parse
    from moe_dist.run.host_memory import for_training_on
    from moe_dist.run.metrics import MetricsLog
    from moe_dist.run.trainer import Trainer

    args, cfg = parse(flags)
    rt = init_runtime(cfg, args.deepspeed_config)
    host_memory = for_training_on(rt.device.type)  # as train.py; process-wide: the bare loop runs under it too
    if host_memory:
        print(host_memory, flush=True)
    data = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed)
    model, engine = build_engine(rt, cfg)
    sampler = GlobalCursorSampler(len(data.train_blocks), cfg.train.global_batch_size, cfg.train.seed)
    trainer = Trainer(cfg, rt, engine, data, sampler, MetricsLog(f"{cfg.checkpoint.output_dir}/m.jsonl", False))
    kernel = next(m.experts.kernel for m in model.moe_layers())

    torch.manual_seed(cfg.train.seed)
    bare = lm.build(cfg.model, device=rt.device)
    bf16 = cfg.parallel.resolved_precision(rt.device.type == "cuda") == "bf16"
    lm.select_expert_kernel(bare, kernel, rt.device, torch.bfloat16 if bf16 else torch.float32)
    bare.gradient_checkpointing = cfg.parallel.activation_checkpointing
    if cfg.parallel.compile:
        from moe_dist.parallel.compile import compile_blocks

        compile_blocks(bare)
    # torch's fastest AdamW on both devices: fused (one kernel over every tensor).
    opt = torch.optim.AdamW(bare.parameters(), lr=cfg.train.adamw_lr, weight_decay=cfg.train.weight_decay, fused=True)
    return {"cfg": cfg, "rt": rt, "data": data, "trainer": trainer, "bare": bare, "opt": opt, "bf16": bf16,
            "kernel": kernel, "sampler": GlobalCursorSampler(len(data.train_blocks), cfg.train.global_batch_size,
                                                           cfg.train.seed + 1)}


def contenders(b: dict[str, Any], names: list[str]) -> dict[str, Callable[[], None]]:
    cfg, rt, bare, opt = b["cfg"], b["rt"], b["bare"], b["opt"]
    layers = list(bare.moe_layers())
    local, seed = layers[0].dispatcher, SeedDispatcher(cfg.model.num_experts)
    clip, params = cfg.train.clip_norm(), [p for p in bare.parameters() if p.requires_grad]

    def micro_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of each micro-batch of the next global batch, on the device."""
        idx = b["sampler"].next_global_batch()
        for mb in b["sampler"].rank_share(idx, 0, 1, rt.layout.micro_batch_size):
            block = b["data"].train_blocks[mb].to(rt.device)
            yield block[:, :-1], block[:, 1:]

    def loss(logits: torch.Tensor, aux: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)) + aux

    def bare_step(kernel: str, dispatcher: Any) -> Callable[[], None]:
        def step() -> None:
            for layer in layers:
                layer.experts.kernel, layer.dispatcher = kernel, dispatcher
            for inputs, targets in micro_batches():
                with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=b["bf16"]):
                    logits, aux = bare(inputs)
                (loss(logits, aux, targets) / rt.layout.grad_accum).backward()
            if clip > 0:  # the same maths as moe_dist's step: clipped at the same global norm
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    engine = b["trainer"].engine

    def engine_step() -> None:
        for inputs, targets in micro_batches():
            logits, aux = engine(inputs)
            engine.backward(loss(logits, aux, targets))
            engine.step()

    every = {"moe": b["trainer"].train_step, "engine": engine_step, "bare": bare_step(b["kernel"], local),
             "bare_loop": bare_step("loop", local), "bare_seed": bare_step(b["kernel"], seed)}
    return {n: every[n] for n in names}


def measure(b: dict[str, Any], fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, Any]:
    from moe_dist.host_syncs import HostSyncCounter

    device = b["rt"].device
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, float] = {n: 0.0 for n in names}
    peak: dict[str, int] = {n: 0 for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            _sync(device)
            if device.type == "cuda":  # each contender's own peak: the other's live state is not reset
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            fns[n]()
            _sync(device)
            dt = time.perf_counter() - t
            if device.type == "cuda":
                peak[n] = max(peak[n], torch.cuda.max_memory_allocated(device))
            if r < warmup:
                first[n] += dt
            else:
                times[n].append(dt)
    ops, syncs = {}, {}
    for n in names:
        with HostSyncCounter() as hs, _OpCount() as oc:
            fns[n]()
        ops[n], syncs[n] = oc.n, hs.total
    tokens = b["cfg"].train.global_batch_size * b["cfg"].train.seq_len
    ratios = {n: [times["bare"][i] / times[n][i] for i in range(rounds)] for n in names if "bare" in times}
    out = {"tokens_per_step": tokens, "seconds": times, "first_s": first, "aten_ops": ops, "host_syncs": syncs,
           "tokens_per_s": {n: tokens / statistics.median(ts) for n, ts in times.items()},
           "vs_bare": {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in ratios.items()},
           "kernel": b["kernel"], "device": str(device)}
    if device.type == "cuda":
        # Per contender, while every contender's parameters and optimizer states are resident: an
        # upper bound on what that contender alone would take.
        out["peak_mem_gib"] = {n: v / 2**30 for n, v in peak.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step_worker", description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--contenders", default="moe,bare")
    a = p.parse_args(argv[:cut])
    flags = argv[cut + 1:]
    if "--output-dir" not in flags:
        flags += ["--output-dir", tempfile.mkdtemp(prefix="train_step_")]
    from moe_dist.parallel.runtime import shutdown

    try:
        b = build(flags)
        res = measure(b, contenders(b, a.contenders.split(",")), a.rounds, a.warmup)
        res["flags"] = flags
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
