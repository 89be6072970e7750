"""The distributed world and the engine: what train.py builds before the loop.

``init_runtime`` starts the processes' group and resolves the engine's config; ``build_engine``
builds this rank's part of the model (``build_model``: on the meta device, experts sharded, each
parameter made where the engine keeps it) and hands it to the engine.
The engine is DeepSpeed ZeRO (``parallel/deepspeed/``, the default) or PyTorch FSDP2
(``parallel/fsdp2/``, ``parallel.engine = "fsdp2"``): one branch in each function below
(see ``parallel/engine.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import RunConfig
from .world import Runtime


def check_layout(cfg: RunConfig, deepspeed_config: Optional[str] = None) -> None:
    """Refuse wrong degrees or batch sizes before anything is created (no process group, no folder)."""
    if cfg.parallel.engine == "fsdp2":
        from .fsdp2.setup import resolve_settings

        resolve_settings(cfg, deepspeed_config)
        return
    from .deepspeed.setup import resolve_layout

    resolve_layout(cfg, deepspeed_config)


def init_runtime(cfg: RunConfig, deepspeed_config: Optional[str] = None,
                 accelerator_kwargs: Optional[dict[str, Any]] = None) -> Runtime:
    """The process group, batch layout and engine config of this run (every rank calls it)."""
    if cfg.parallel.engine == "fsdp2":
        from .fsdp2.setup import init_fsdp2_runtime

        return init_fsdp2_runtime(cfg, deepspeed_config, accelerator_kwargs)
    from .deepspeed.setup import init_deepspeed_runtime

    return init_deepspeed_runtime(cfg, deepspeed_config, accelerator_kwargs)


def build_model(rt: Runtime, cfg: RunConfig,
                fill: Optional[Callable[[str, torch.Tensor], None]] = None) -> nn.Module:
    """This rank's part of the model every rank builds identically (same seed), sharded by EP.

    ``fill(name, tensor)`` writes a parameter's full fp32 value (``--init-from``); None: the model's
    own initialisation. With ``parallel.sharded_build`` (the default) no rank holds the whole model:
    it is built on the meta device, EP drops the experts this rank does not own, then each module's
    parameters are made in the training dtype on the training device and, under ZeRO-3, partitioned
    at once (``parallel/materialize.py``). Otherwise every rank builds the full fp32 model on the CPU
    first and the engine shards it (the path start-up memory is measured against:
    ``benchmarks/bench_startup.py``). Both give the same values, bit for bit."""
    from .. import model as lm
    from .deepspeed.experts import apply_expert_parallel
    from .materialize import fill_full, materialize

    torch.manual_seed(cfg.train.seed)
    sharded = cfg.parallel.sharded_build
    model = lm.build(cfg.model, "meta" if sharded else None)
    if fill is not None:
        fill = lm.per_expert_fill(model, fill)  # readers know per-expert names; the model stacks experts
    if not sharded and fill is not None:
        fill_full(model, fill)
    model.gradient_checkpointing = cfg.parallel.activation_checkpointing
    for layer in model.moe_layers():
        layer.capacity_factor = cfg.parallel.capacity_factor
    if rt.engine == "fsdp2":  # FSDP2 shards experts and makes the meta parameters itself (fsdp2/engine.py)
        return model
    apply_expert_parallel(model, cfg, rt)
    if sharded:
        convert = None
        if rt.zero_stage == 3:
            from .deepspeed.zero_init import zero3_converter

            convert = zero3_converter(rt.ds_config)
        dtype = torch.bfloat16 if rt.ds_config["bf16"]["enabled"] else torch.float32
        materialize(model, fill or model.init_parameter, rt.device, dtype, convert)
    return model


def build_engine(rt: Runtime, cfg: RunConfig,
                 fill: Optional[Callable[[str, torch.Tensor], None]] = None) -> tuple[nn.Module, Any]:
    """:func:`build_model`, handed to the engine."""
    from .. import model as lm
    from ..logging_utils import get_logger

    model = build_model(rt, cfg, fill)
    bf16 = (cfg.parallel.resolved_precision(rt.device.type == "cuda") == "bf16" if rt.engine == "fsdp2"
            else rt.ds_config["bf16"]["enabled"])
    dtype = torch.bfloat16 if bf16 else torch.float32
    kernel = lm.select_expert_kernel(model, cfg.parallel.expert_kernel, rt.device, dtype)
    get_logger().info(f"experts: {kernel} kernel on {rt.device.type} in {str(dtype).removeprefix('torch.')} "
                      f"(parallel.expert_kernel={cfg.parallel.expert_kernel})")
    if cfg.parallel.compile:
        from .compile import compile_blocks

        get_logger().info(f"torch.compile: {compile_blocks(model)} blocks, compiled on their first step")
    if rt.engine == "fsdp2":
        from .fsdp2.engine import prepare_fsdp2_engine

        fill = lm.per_expert_fill(model, fill) if fill is not None else model.init_parameter
        return model, prepare_fsdp2_engine(rt, model, cfg, fill)
    from .deepspeed.setup import prepare_engine

    return model, prepare_engine(rt, model, cfg)


def shutdown(barrier: bool = True) -> None:
    """Tear the process group down explicitly: ZeRO-3 + offload can abort at interpreter exit otherwise.
    ``barrier=False`` after a fault of this rank alone: its peers may be waiting in another collective."""
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()
