"""FSDP2 set-up: the run's settings, the process group and the device mesh.

No Accelerate on the training path: ``accelerate launch`` (or torchrun) only starts the processes,
and we initialise the process group ourselves (gloo on CPU, NCCL on CUDA, one device per rank:
``cuda:LOCAL_RANK``). Accelerate 1.15 would wrap the model itself and, on a machine without a GPU,
silently drop FSDP (``distributed_type`` stays NO, gradients are never synchronised), so a launch
config asking Accelerate for FSDP or DeepSpeed is refused here; ``launch_configs/cpu_fsdp2.yaml``
asks for plain multi-process launching. Trackers still go through an ``Accelerator``, built only
when ``--report-to`` names one, and checked to see every process.

The mesh is ``(dp, ep)`` with ``dp = world / ep``, rank ``d * ep + e`` at ``(d, e)``: EP groups are
consecutive ranks ``[0, 1], [2, 3]`` and each expert's data-parallel group is ``[0, 2], [1, 3]``,
as under DeepSpeed. Dense weights are sharded over the whole world (a 1-D mesh of its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ...config import ConfigError, RunConfig
from ...logging_utils import get_logger, quiet_third_party, warn_once
from ..dims import batch_layout, validate_ep
from ..world import Runtime, single_process_defaults


@dataclass(frozen=True)
class Fsdp2Settings:
    """What ``--engine fsdp2`` resolved the RunConfig to (torch-free, checked once)."""

    dp_size: int           # ranks that share one expert (world / ep)
    ep_size: int
    precision: str         # 'fp32' or 'bf16' (bf16 compute, fp32 shards and gradient reduction)
    cpu_offload: bool      # FSDP2 CPUOffloadPolicy: shards, gradients and optimizer states on the host
    optimizer: str         # 'muon' (Muon + AdamW) or 'adamw'
    grad_clip: float       # max global gradient norm; 0 = off


def _refuse_accelerate_engines() -> None:
    """A launch config that asks Accelerate for FSDP or DeepSpeed would not be used (see module doc)."""
    for var, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(var, "").lower() in ("1", "true"):
            raise ConfigError(f"parallel.engine: expected a launch config with distributed_type MULTI_GPU for "
                              f"--engine fsdp2, found distributed_type {what} ({var}=true); moe_dist applies FSDP2 "
                              "itself. Launch with --config_file launch_configs/cpu_fsdp2.yaml (or gpu_fsdp2.yaml), "
                              "or use torchrun")


def resolve_settings(cfg: RunConfig, deepspeed_config: Optional[str] = None,
                     world_size: Optional[int] = None) -> Fsdp2Settings:
    """Check the degrees and flags of an FSDP2 run; no process group. Errors name the field."""
    p, t = cfg.parallel, cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if deepspeed_config:
        raise ConfigError(f"--deepspeed-config {deepspeed_config}: a DeepSpeed JSON does not apply to --engine fsdp2; "
                          "drop it (precision, offload and clipping are --set parallel.* / train.* fields)")
    if p.zero_stage is not None:
        raise ConfigError(f"parallel.zero_stage: expected None with --engine fsdp2 (it always shards parameters, "
                          f"gradients and optimizer states, like ZeRO-3), found {p.zero_stage}; drop --zero-stage")
    batch_layout(cfg, world)
    validate_ep(cfg, world)
    on_gpu = torch.cuda.is_available()
    return Fsdp2Settings(dp_size=world // p.ep_size, ep_size=p.ep_size, precision=p.resolved_precision(on_gpu),
                         cpu_offload=bool(p.offload_optimizer or p.offload_params), optimizer=t.optimizer,
                         grad_clip=t.clip_norm())


def _init_process_group(on_gpu: bool, cfg: RunConfig) -> None:
    from ..timeouts import enable_flight_recorder, init_timeout

    if dist.is_initialized():
        return
    single_process_defaults()  # plain `python moe_dist/train.py`
    enable_flight_recorder(cfg.checkpoint.output_dir, on_gpu)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=init_timeout(cfg))


def init_fsdp2_runtime(cfg: RunConfig, deepspeed_config: Optional[str] = None,
                       accelerator_kwargs: Optional[dict[str, Any]] = None) -> Runtime:
    """The process group, the device of this rank and the resolved settings (every rank calls it).

    ``accelerator_kwargs``: the trackers (see moe_dist.run.trackers); an Accelerator is built only for them."""
    quiet_third_party()
    _refuse_accelerate_engines()
    settings = resolve_settings(cfg, deepspeed_config)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    _init_process_group(on_gpu, cfg)
    world = dist.get_world_size()
    accelerator = None
    if accelerator_kwargs:
        from accelerate import Accelerator

        accelerator = Accelerator(**accelerator_kwargs)
        if accelerator.num_processes != world:
            raise RuntimeError(f"Accelerate sees {accelerator.num_processes} processes but the process group has "
                               f"{world}; its trackers would log from every rank")
    if settings.cpu_offload and not on_gpu:
        warn_once("parallel.offload_*: FSDP2's CPUOffloadPolicy on a CPU-only machine changes nothing but the "
                  "code path (everything is on the host already)")
    return Runtime(accelerator, dist.get_rank(), world, device, batch_layout(cfg, world), {}, engine="fsdp2",
                   engine_settings=settings)


@dataclass
class Meshes:
    """The device meshes of an FSDP2 run: ``world`` shards dense weights, ``dp`` an expert's
    weights, ``ep`` carries the all-to-all (``dp`` and ``ep`` are one 2-D mesh's dimensions)."""

    world: Any
    dp: Any
    ep: Any


def build_meshes(rt: Runtime) -> Meshes:
    from torch.distributed.device_mesh import init_device_mesh

    s: Fsdp2Settings = rt.engine_settings
    kind = rt.device.type
    grid = init_device_mesh(kind, (s.dp_size, s.ep_size), mesh_dim_names=("dp", "ep"))
    world = init_device_mesh(kind, (rt.world_size,), mesh_dim_names=("world",))
    get_logger().debug(f"FSDP2 mesh dp {s.dp_size} x ep {s.ep_size}")
    return Meshes(world=world, dp=grid["dp"], ep=grid["ep"])
