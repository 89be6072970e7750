"""``moe-plan``'s command line: its flags, the run config they make (``config_from_args``), and the
three modes: one plan (the default), ``--choose`` the layout, ``--fit`` the largest model.
The terms are in ``plan/memory.py``, the search in ``plan/layout_search.py``, the tables in
``plan/report.py``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from ..cli_args import Parser
from ..config import PRESETS, ConfigError, RunConfig, apply_overrides, get_preset
from ..parallel.deepspeed.config import read_launch_json
from .layout_search import choose, fit
from .memory import Hardware, plan
from .report import print_choice, print_fit, render
from .units import parse_bytes


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="moe-plan", description="Estimate per-GPU and per-node CPU memory of a "
                                "moe_dist run and say whether it fits. Unset flags take the preset's values, then the launch "
                                "JSON's. Exit code 0 whether or not it fits (2 for an invalid configuration).")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="Model/training preset.")
    p.add_argument("--launch-config", metavar="JSON", help="DeepSpeed launch JSON (zero stage, offload, buckets); "
                   "preset values and flags win over it, as in the trainer.")
    p.add_argument("--zero-stage", type=int, choices=[1, 2, 3], help="ZeRO stage.")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="Master weights, optimizer states and fp32 grads on CPU.")
    p.add_argument("--offload-params", action=argparse.BooleanOptionalAction, default=None,
                   help="ZeRO-3 parameter partitions on CPU.")
    p.add_argument("--ep-size", type=int, help="Expert-parallel degree.")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="Recompute each block in backward.")
    p.add_argument("--engine", choices=["deepspeed", "fsdp2"],
                   help="Training engine (default deepspeed); fsdp2 is planned with ZeRO-3's terms.")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="Training precision (default: bf16 on GPU).")
    p.add_argument("--optimizer", choices=["muon", "adamw"], help="Optimizer (Muon also uses AdamW for "
                   "embeddings and norms).")
    p.add_argument("--micro-batch-size", "--micro-batch", dest="micro_batch", type=int,
                   help="Sequences per rank per forward pass [train.micro_batch_size] (as in moe-train).")
    p.add_argument("--seq-len", type=int, help="Tokens per sequence.")
    p.add_argument("--global-batch-size", "--global-batch", dest="global_batch", type=int,
                   help="Sequences per optimizer step (sets grad accumulation) [train.global_batch_size].")
    p.add_argument("--gpu-mem", default="24GB", help="Memory per GPU (default 24GB).")
    p.add_argument("--cpu-mem", default="64GB", help="Memory per node (default 64GB).")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (= processes) per node.")
    p.add_argument("--nodes", type=int, default=1, help="Nodes.")
    p.add_argument("--accelerator", choices=["cuda", "cpu"], default="cuda",
                   help="'cpu' plans a CPU-only run (the demo): all tensors in host memory.")
    p.add_argument("--full-build", action="store_true", help="Plan start-up with parallel.sharded_build=false: "
                   "every rank builds the full fp32 model on the CPU before the engine shards it.")
    p.add_argument("--host-buffer-factor", type=float, default=1.5,
                   help="Slack on host-side model states (DeepSpeed's additional_buffer_factor).")
    p.add_argument("--choose", action="store_true",
                   help="Pick the layout: try ZeRO-1, ZeRO-2, ZeRO-3, ZeRO-2 + optimizer offload, ZeRO-3 + optimizer "
                   "offload, ZeRO-3 + optimizer and parameter offload (with every EP degree on several GPUs), fastest "
                   "first, and plan the first whose GPU and CPU peaks fit. Not with --zero-stage, --ep-size or "
                   "--offload-*.")
    p.add_argument("--fit", action="store_true",
                   help="The largest model of the preset's family that fits this machine: scales d_model (multiples "
                   "of head_dim) with n_layers at the preset's aspect ratio, then adds layers while they fit; d_ff "
                   "keeps its ratio to d_model; num_experts x1/2, 1, 2, 4. Keeps head_dim, top_k, vocabulary and "
                   "batch. Each candidate gets the --choose layout.")
    return p


def config_from_args(a: argparse.Namespace) -> RunConfig:
    cfg = get_preset(a.preset)
    over: dict[str, Any] = {}
    for flag, key in (("engine", "parallel.engine"), ("zero_stage", "parallel.zero_stage"),
                      ("offload_optimizer", "parallel.offload_optimizer"),
                      ("offload_params", "parallel.offload_params"), ("ep_size", "parallel.ep_size"),
                      ("activation_checkpointing", "parallel.activation_checkpointing"),
                      ("precision", "parallel.precision"), ("optimizer", "train.optimizer"),
                      ("micro_batch", "train.micro_batch_size"), ("seq_len", "train.seq_len"),
                      ("global_batch", "train.global_batch_size")):
        if getattr(a, flag) is not None:
            over[key] = getattr(a, flag)
    if a.full_build:
        over["parallel.sharded_build"] = False
    return apply_overrides(cfg, over)


def hardware(a: argparse.Namespace) -> Hardware:
    return Hardware(gpu_mem=parse_bytes(a.gpu_mem, "--gpu-mem"), cpu_mem=parse_bytes(a.cpu_mem, "--cpu-mem"),
                    gpus_per_node=a.gpus_per_node, nodes=a.nodes, accelerator=a.accelerator,
                    host_buffer_factor=a.host_buffer_factor)


def main_search(a: argparse.Namespace, console: Any) -> int:
    """``moe-plan --choose`` and ``moe-plan --fit``: the flags that fix a layout are refused."""
    flag = "--fit" if a.fit else "--choose"
    fixed = [f for f, v in (("--zero-stage", a.zero_stage), ("--ep-size", a.ep_size),
                            ("--offload-optimizer", a.offload_optimizer), ("--offload-params", a.offload_params))
             if v is not None]
    if fixed:
        raise ConfigError(f"{flag} picks the layout itself; drop {', '.join(fixed)} (or drop {flag} to plan that "
                          "layout)")
    cfg = config_from_args(a)
    hw = hardware(a)
    launch = read_launch_json(a.launch_config)
    where = f"{a.gpus_per_node} x {a.nodes} GPU(s) of {a.gpu_mem}, {a.cpu_mem} RAM per node"
    if a.fit:
        print_fit(fit(cfg, hw, launch), cfg, where, console)
    else:
        print_choice(choose(cfg, hw, launch), cfg, where, console)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from rich.console import Console

    a = build_parser().parse_args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    if a.choose or a.fit:
        try:
            return main_search(a, console)
        except ConfigError as e:
            console.print(f"[red]error:[/] {e}")
            return 2
    try:
        cfg = config_from_args(a)
        hw = hardware(a)
        launch = read_launch_json(a.launch_config)
        pl = plan(cfg, hw, launch)
    except ConfigError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    render(pl, cfg.preset, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
