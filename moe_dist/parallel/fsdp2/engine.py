"""An FSDP2-sharded model and its optimizers seen through :class:`moe_dist.parallel.engine.Engine`.

One optimizer step = ``grad_accum`` micro-batches: each backward scales its loss by
``1 / grad_accum`` (as DeepSpeed does) and FSDP2 reduce-scatters and accumulates into the sharded
gradients; after the last one, expert gradients are divided by the EP degree (see
``sharding.py``), the global norm is taken and the gradients clipped, and the optimizers step.

Gradient norm: every element of every trainable parameter lives on exactly one rank of the world
(dense weights are sharded over the world, each expert over its ``dp`` ranks and held by one EP
rank of each row), so the sum of the local squared shards, all-reduced over the world, is the
square of the global norm: each expert counted once.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ...checkpoint.fragment import Fragment
from ...config import RunConfig
from ...logging_utils import get_logger
from ..engine import per_expert_fragments, per_expert_tensors
from ..world import Runtime
from . import fragments
from .muon import ShardedMuon
from .optimizer import build_optimizers, init_adamw_state
from .setup import Fsdp2Settings, build_meshes
from .sharding import apply_fsdp2, expert_params, make_shards


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Fsdp2TrainEngine:
    def __init__(self, module: nn.Module, optimizers: list[torch.optim.Optimizer], settings: Fsdp2Settings,
                 grad_accum: int, device: torch.device) -> None:
        self.module, self.optimizers, self.settings = module, optimizers, settings
        self.grad_accum, self.device = grad_accum, device
        ids = expert_params(module)
        self._experts = [p for p in module.parameters() if id(p) in ids]
        self._params = [p for p in dict.fromkeys(module.parameters()) if p.requires_grad]
        self._micro = 0
        self._norm: Optional[float] = None

    def __call__(self, tokens_BT: torch.Tensor, **kwargs: Any) -> Any:
        return self.module(tokens_BT, **kwargs)  # the root's forward: FSDP2 hooks need it

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()
        self._micro += 1
        if self._micro == self.grad_accum:
            self._finish_gradients()

    @torch.no_grad()
    def _finish_gradients(self) -> None:
        if self.settings.ep_size > 1:
            for p in self._experts:
                if p.grad is not None:
                    _local(p.grad).div_(self.settings.ep_size)

    @torch.no_grad()
    def _clip(self) -> float:
        """The global gradient norm (one all-reduce, one read-back), and the clip applied on the device.

        ``foreach`` kernels over every local gradient, not a Python loop per parameter; the clip factor
        ``min(1, clip / (norm + 1e-6))`` stays a device tensor, so only the logged norm crosses to the host."""
        grads = [_local(p.grad) for p in self._params if p.grad is not None]
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32) if grads else []
        sq = torch.stack(norms).square().sum().to(self.device) if norms else \
            torch.zeros((), dtype=torch.float32, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(sq)
        norm = sq.sqrt()
        clip = self.settings.grad_clip
        if clip > 0 and grads:
            coef = (clip / (norm + 1e-6)).clamp(max=1.0)
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for g in grads:
                by_dtype.setdefault(g.dtype, []).append(g)
            for dtype, gs in by_dtype.items():
                torch._foreach_mul_(gs, coef.to(device=gs[0].device, dtype=dtype))
        return float(norm)

    def step(self) -> None:
        if self._micro < self.grad_accum:
            return
        self._micro = 0
        self._norm = self._clip()
        if not math.isfinite(self._norm):  # a non-finite step makes no update, as DeepSpeed's (see run/guard.py)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            return
        if not self.has_optimizer_state():
            self.materialize_optimizer_state()  # explicit devices, not torch's lazy default-device step
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def grad_norm(self) -> Optional[float]:
        return self._norm

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def full_gradients(self) -> dict[str, torch.Tensor]:
        grads = {}
        for name, p in self.module.named_parameters():
            if p.grad is not None:  # full_tensor: collective over the parameter's mesh
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name] = g.detach().float().cpu().clone().contiguous()
        return per_expert_tensors(self.module, grads)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    # ---- checkpoint hooks
    def checkpoint_fragments(self) -> list[Fragment]:
        # After a forward without backward (validation) the root keeps its gathered weights, and a
        # gathered module lists them as its parameters: shard everything back to list the shards.
        self._reshard()
        return per_expert_fragments(self.module, fragments.local_fragments(self.module, self.optimizers))

    def has_optimizer_state(self) -> bool:
        return all(len(opt.state.get(p, {})) > 0 for opt in self.optimizers
                   for g in opt.param_groups for p in g["params"])

    @torch.no_grad()
    def materialize_optimizer_state(self) -> bool:
        created = False
        for opt in self.optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    if len(opt.state.get(p, {})) == 0:
                        if isinstance(opt, ShardedMuon):
                            opt.init_state(p)
                        else:
                            init_adamw_state(opt, p)
                        created = True
        return created

    def sync_weights_from_masters(self) -> None:
        """The shards are the fp32 masters; drop any gathered copy so the next forward gathers them."""
        self._reshard()

    def _reshard(self) -> None:
        """Free every gathered copy (local: no collective)."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def prepare_fsdp2_engine(rt: Runtime, model: nn.Module, cfg: RunConfig,
                         fill: Callable[[str, torch.Tensor], None]) -> Fsdp2TrainEngine:
    """Shard ``model`` (EP + FSDP2 units), build its optimizers and the engine behind the seam.

    A model built on the meta device gets its shards here, written by ``fill`` (see ``make_shards``)."""
    s: Fsdp2Settings = rt.engine_settings
    apply_fsdp2(model, cfg.model.num_experts, build_meshes(rt), s)
    if any(p.is_meta for p in model.parameters()):
        make_shards(model, fill, torch.device("cpu") if s.cpu_offload else rt.device)
    optimizers = build_optimizers(model, s.optimizer, cfg.train, rt.device)
    get_logger().info(f"FSDP2 dp {s.dp_size} x ep {s.ep_size}, {s.precision}, offload {s.cpu_offload}, optimizer "
                      f"{s.optimizer}, clip {s.grad_clip or 'off'}, world {rt.world_size}, micro "
                      f"{rt.layout.micro_batch_size} x accum {rt.layout.grad_accum} x dp {rt.layout.data_parallel_size}"
                      f" = global {rt.layout.global_batch_size}")
    return Fsdp2TrainEngine(model, optimizers, s, rt.layout.grad_accum, rt.device)
