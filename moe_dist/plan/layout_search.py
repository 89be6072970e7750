"""``moe-plan --choose`` and ``moe-plan --fit``: the fastest layout that fits, and the largest model that fits.

Layouts are tried fastest first (``candidate_layouts``):

  ZeRO-1 < ZeRO-2 (each with EP 1, then every larger EP degree that divides the experts and the world)
  < ZeRO-3 (the largest such EP degree first, down to EP 1) < ZeRO-2 + optimizer offload (EP as for
  ZeRO-2) < ZeRO-3 + optimizer offload (EP as for ZeRO-3) < ZeRO-3 + optimizer and parameter offload
  (EP as for ZeRO-3).

Why this order: ZeRO-1/2 keep the working parameters whole on each GPU, ZeRO-3 gathers them module by
module in every forward and backward; optimizer offload moves the optimizer step to the CPU and
every step's gradients and parameters over PCIe; parameter offload adds the parameters' trips in
forward and backward. A larger EP degree saves expert memory for an all-to-all per MoE layer, so it
comes after EP 1 within ZeRO-1/2. Under ZeRO-3 it is the other way round: every forward and
backward all-gathers the parameters a rank uses, Pne + Pe/ep of them, over its partition group, so
EP ep divides the gathered expert weights by ep for an all-to-all of activations (top_k x tokens x
d_model per layer, far smaller than an MoE layer's experts), and memory per rank is the same P/N
partition either way. It is an order by what each layout adds, not a measured ranking.
Everything else (micro batch, activation checkpointing, precision, optimizer) stays as the preset,
launch JSON and flags set it.

``fit`` scales a preset's family: ``d_model`` over multiples of ``head_dim`` (n_heads = d_model /
head_dim), ``d_ff`` = ``d_model`` x the preset's d_ff/d_model ratio rounded to a multiple of 64,
``n_layers`` (first at the preset's d_model/n_layers aspect, then as many more as fit at that
width), and ``num_experts`` over the preset's count x {1/2, 1, 2, 4}; it keeps head_dim, top_k, the
expert type, vocabulary, sequence length and batch. Width and depth move together because the
binding limit is usually host RAM, which grows with the parameter count alone: maximising
parameters over d_model and n_layers independently returns 3-head, 250-layer models (measured:
d_model 384 x 249 layers on 24 GB + 128 GB), equal in size to sane ones and useless as advice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError, RunConfig
from .memory import Hardware, Plan, plan
from .param_counts import count_params


@dataclass(frozen=True)
class Layout:
    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    ep_size: int = 1

    @property
    def label(self) -> str:
        off = "+".join(x for x, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on)
        return f"ZeRO-{self.zero_stage}, EP {self.ep_size}, offload {off or 'none'}"

    @property
    def train_flags(self) -> str:
        """The moe-train flags that select this layout over any launch JSON."""
        return (f"--zero-stage {self.zero_stage} --ep-size {self.ep_size} "
                f"--set parallel.offload_optimizer={str(self.offload_optimizer).lower()} "
                f"--set parallel.offload_params={str(self.offload_params).lower()}")

    def apply(self, cfg: RunConfig) -> RunConfig:
        par = dataclasses.replace(cfg.parallel, zero_stage=self.zero_stage, ep_size=self.ep_size,
                                  offload_optimizer=self.offload_optimizer, offload_params=self.offload_params)
        return dataclasses.replace(cfg, parallel=par)


def candidate_layouts(num_experts: int, world_size: int) -> list[Layout]:
    """Every layout the trainer supports for this world size, fastest first (module docstring)."""
    eps = [k for k in range(1, num_experts + 1) if num_experts % k == 0 and world_size % k == 0]
    down = eps[::-1]  # ZeRO-3: larger EP gathers fewer expert weights (module docstring)
    return ([Layout(s, ep_size=k) for s in (1, 2) for k in eps] + [Layout(3, ep_size=k) for k in down]
            + [Layout(2, offload_optimizer=True, ep_size=k) for k in eps]
            + [Layout(3, offload_optimizer=True, ep_size=k) for k in down]
            + [Layout(3, offload_optimizer=True, offload_params=True, ep_size=k) for k in down])


@dataclass
class Choice:
    layout: Optional[Layout]               # the first that fits, None if none does
    plan: Optional[Plan]                   # its plan
    tried: list[tuple[Layout, Plan]]       # every layout tried, in order, up to the chosen one


def choose(cfg: RunConfig, hw: Hardware, launch: Optional[dict] = None) -> Choice:
    """The fastest layout (``candidate_layouts`` order) whose GPU and CPU peaks both fit ``hw``."""
    tried = []
    for lay in candidate_layouts(cfg.model.num_experts, hw.world_size):
        pl = plan(lay.apply(cfg), hw, launch)
        tried.append((lay, pl))
        if pl.fits:
            return Choice(lay, pl, tried)
    return Choice(None, None, tried)


# --------------------------------------------------------------------------- --fit
EXPERT_FACTORS = (0.5, 1, 2, 4)
MAX_LAYERS = 1024
MAX_D_MODEL_HEADS = 512          # d_model up to 512 x head_dim


@dataclass(frozen=True)
class FitResult:
    num_experts: int
    d_model: int
    n_layers: int
    cfg: RunConfig
    choice: Choice

    @property
    def params(self) -> int:
        return count_params(self.cfg.model).total


def scaled(cfg: RunConfig, d_model: int, n_layers: int, num_experts: int) -> RunConfig:
    """The preset's family member with this d_model, depth and expert count (module docstring)."""
    m = cfg.model
    hd, ratio = m.head_dim, m.d_ff / m.d_model
    if d_model % hd:
        raise ConfigError(f"--fit: d_model ({d_model}) must be a multiple of the family's head_dim ({hd})")
    kv = None if m.n_kv_heads is None else max(1, m.n_kv_heads * d_model // m.d_model)
    model = dataclasses.replace(m, d_model=d_model, n_heads=d_model // hd, n_kv_heads=kv, n_layers=n_layers,
                                num_experts=num_experts, d_ff=max(64, round(d_model * ratio / 64) * 64))
    return dataclasses.replace(cfg, model=model)


def family_depth(cfg: RunConfig, d_model: int) -> int:
    """n_layers at the preset's aspect ratio (d_model / n_layers) for this width."""
    return max(1, round(cfg.model.n_layers * d_model / cfg.model.d_model))


def family_experts(cfg: RunConfig) -> list[int]:
    e, k = cfg.model.num_experts, cfg.model.top_k
    return sorted({int(e * f) for f in EXPERT_FACTORS if int(e * f) >= max(k, 1)})


def fit(cfg: RunConfig, hw: Hardware, launch: Optional[dict] = None,
        experts: Optional[list[int]] = None) -> list[FitResult]:
    """For each expert count, the largest family member whose best layout fits; most parameters first.

    Width first: the widest d_model (a multiple of head_dim) that fits at the preset's aspect ratio
    (``family_depth``), found by doubling then bisecting (memory grows with d_model and n_layers);
    then depth: layers added at that width while it still fits. So the next member up, one head
    wider at ``max(n_layers, family_depth)`` or one layer deeper, does not fit.
    """
    hd = cfg.model.head_dim

    def best(e: int, d: int, L: int) -> Choice:
        return choose(scaled(cfg, d, L, e), hw, launch)

    def fits_at(e: int, k: int) -> bool:
        return best(e, k * hd, family_depth(cfg, k * hd)).layout is not None

    out = []
    for e in experts or family_experts(cfg):
        lo, hi = 0, 1
        while hi <= MAX_D_MODEL_HEADS and fits_at(e, hi):
            lo, hi = hi, hi * 2
        hi = min(hi, MAX_D_MODEL_HEADS + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits_at(e, mid) else (lo, mid)
        if lo == 0:
            continue
        d = lo * hd
        L = family_depth(cfg, d)
        while L < MAX_LAYERS and best(e, d, L + 1).layout is not None:
            L += 1
        out.append(FitResult(e, d, L, scaled(cfg, d, L, e), best(e, d, L)))
    return sorted(out, key=lambda r: -r.params)


# --------------------------------------------------------------------------- CLI (moe-plan)
