"""Accelerate + DeepSpeed set-up: the launch JSON and RunConfig become a DeepSpeed config, the
process group and an engine behind the seam (:class:`moe_dist.parallel.engine.Engine`).

Accelerate launches the processes and owns the DeepSpeed plugin; DeepSpeed owns ZeRO and the
optimizer. On a machine with no GPU, Accelerate silently reports ``num_processes == 1`` on every
rank unless the process-group backend is named, so we always name it (gloo on CPU).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ...config import RunConfig
from ...logging_utils import get_logger, quiet_third_party
from ...run.optim import param_groups, tag_parameters
from ..dims import BatchLayout, batch_layout, validate_ep
from ..world import Runtime, single_process_defaults
from .config import build_ds_config, read_launch_json
from .cuda_arch import fix_arch_list_for_deepspeed
from .jit_locks import warn_stale_build_locks


def _launch_json_path(explicit: Optional[str]) -> Optional[str]:
    path = explicit or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and not os.path.isabs(path) and not os.path.exists(path):
        # The YAMLs name their JSON relative to the repo root; allow launching from elsewhere.
        repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        candidate = os.path.join(repo_root, path)
        if os.path.exists(candidate):
            return candidate
    return path


def resolve_layout(cfg: RunConfig, deepspeed_config: Optional[str] = None) -> tuple[dict[str, Any], BatchLayout]:
    """The DeepSpeed config and batch layout of this run, with the degrees checked: the one check,
    with the ZeRO stage the launch JSON and flags resolve to. No process group: every rank refuses
    on its own, before anything is created."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    base = read_launch_json(_launch_json_path(deepspeed_config))
    ds_config = build_ds_config(cfg, base, world_size, torch.cuda.is_available())
    layout = batch_layout(cfg, world_size)
    validate_ep(cfg, world_size)
    return ds_config, layout


def select_deepspeed_accelerator() -> None:
    """Tell DeepSpeed which accelerator to use (``DS_ACCELERATOR``), before it is first imported: it
    reads the variable once, at import. A value already set (a test, the user) wins."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def init_deepspeed_runtime(cfg: RunConfig, deepspeed_config: Optional[str] = None,
                 accelerator_kwargs: Optional[dict[str, Any]] = None) -> Runtime:
    """Create the Accelerator with a DeepSpeed plugin built from the launch JSON + RunConfig.

    ``accelerator_kwargs``: more arguments of ``Accelerator`` (the trackers, see moe_dist.trackers)."""
    select_deepspeed_accelerator()  # first: Accelerate imports DeepSpeed below
    quiet_third_party()
    arch_note = fix_arch_list_for_deepspeed()  # before any op build (the first optimizer step)
    if arch_note:
        get_logger().warning(arch_note)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        warn_stale_build_locks(get_logger().warning)  # before DeepSpeed's comm set-up loads its shm op
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from ..timeouts import enable_flight_recorder, init_timeout

    on_gpu = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config, layout = resolve_layout(cfg, deepspeed_config)
    os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    single_process_defaults()  # plain `python moe_dist/train.py`: DeepSpeed still wants a process group
    # We hand Accelerate a complete DeepSpeed config; the launcher's copies of the YAML's DeepSpeed
    # fields would make it refuse ("will be ignored") although they are already merged in.
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    enable_flight_recorder(cfg.checkpoint.output_dir, on_gpu)
    pg = InitProcessGroupKwargs(backend="nccl" if on_gpu else "gloo", timeout=init_timeout(cfg))
    precision = "bf16" if ds_config["bf16"]["enabled"] else "no"
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision
    # Not cpu=True: that makes Accelerate pick plain multi-CPU DDP and ignore the DeepSpeed plugin.
    os.environ.pop("ACCELERATE_USE_CPU", None)
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[pg], mixed_precision=precision,
                              gradient_accumulation_steps=layout.grad_accum, **(accelerator_kwargs or {}))
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"Accelerate sees {accelerator.num_processes} processes but WORLD_SIZE is {world_size}; "
                           "the process group was not initialised as expected")
    if not dist.is_initialized():
        raise RuntimeError("no torch.distributed process group after Accelerator(); DeepSpeed needs one")
    return Runtime(accelerator, accelerator.process_index, world_size, accelerator.device, layout, ds_config)


def prepare_engine(rt: Runtime, model: nn.Module, cfg: RunConfig) -> Any:
    """Hand the model to DeepSpeed through Accelerate; returns the engine behind the seam
    (:class:`~moe_dist.parallel.engine.Engine`)."""
    from accelerate.utils import DummyOptim

    tag_parameters(model)
    optimizer = DummyOptim(param_groups(model, cfg.train.weight_decay, cfg.train.weight_decay_on),
                           lr=cfg.train.adamw_lr,
                           weight_decay=cfg.train.weight_decay)
    engine, _ = rt.accelerator.prepare(model, optimizer)
    from deepspeed import DeepSpeedEngine

    if not isinstance(engine, DeepSpeedEngine):
        raise RuntimeError(f"Accelerate prepared a {type(engine).__name__}, not a DeepSpeedEngine: the launch config "
                           "must use distributed_type: DEEPSPEED (and not use_cpu: true)")
    from .engine import DeepSpeedTrainEngine

    engine = DeepSpeedTrainEngine(engine)
    fused = " (torch AdamW, fused)" if engine.fused_adamw else ""
    get_logger().info(f"DeepSpeed ZeRO-{rt.zero_stage}, optimizer {rt.optimizer_kind}{fused}, world {rt.world_size}, "
                      f"micro {rt.layout.micro_batch_size} x accum {rt.layout.grad_accum} x dp "
                      f"{rt.layout.data_parallel_size} = global {rt.layout.global_batch_size}")
    return engine
