"""Mixture-of-experts feed-forward: router, experts, and the local (single-process) dispatcher.

The layer is split in three so that parallelism can be applied from outside:

* the **router** (a bias-free ``nn.Linear`` named ``router``) scores experts; :func:`route` turns
  the scores into top-k choices, renormalised weights, the load-balancing loss and counts;
* the **experts** (:class:`~.experts.GroupedExperts`, ``layer.experts``) hold the layer's local
  experts stacked and compute them with grouped GEMMs; every expert keeps its global name in
  ``state_dict()`` and in checkpoints;
* the **dispatcher** is a plain object (``layer.dispatcher``), not a submodule, so expert
  parallelism can swap :class:`LocalDispatcher` for an all-to-all one without touching
  parameters. Both share :func:`flatten_assignments`, which fixes the order and the capacity
  rule, so dropping decisions are identical with and without expert parallelism.

No host sync anywhere in a layer (the loop fallback aside): counts are static-shape histograms,
group offsets a device-side cumsum, and a capacity drop zeroes a weight instead of shrinking a
tensor, so the CPU queues kernels ahead of the GPU and ``torch.compile`` sees fixed shapes.

Legend: B batch, T tokens (B*seq in the layer), D d_model, F d_ff, E global experts, El local
experts, K top-k, A (token, expert) assignments (T*K), N rows given to one expert.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .dropout import assignment_keys, draw_base
from .experts import Expert, GroupedExperts


def expert_histogram(expert_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of ``expert_A`` name each expert, as a long (E,) tensor: a static-shape scatter-add
    (``bincount`` would read its bounds back to the host)."""
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=expert_A.device)
    return counts_E.scatter_add_(0, expert_A.reshape(-1), torch.ones_like(expert_A.reshape(-1)))


class Routing(NamedTuple):
    idx_TK: torch.Tensor             # chosen experts (global ids), long
    weight_TK: torch.Tensor          # fp32 weights, each row sums to 1
    aux_loss: torch.Tensor           # fp32 scalar, Switch load-balancing loss of this layer
    tokens_per_expert_E: torch.Tensor  # long, detached: router assignments before any capacity drop


def route(logits_TE: torch.Tensor, top_k: int) -> Routing:
    """Top-k routing on (already noised) logits.

    Softmax runs in fp32 whatever the model dtype: bf16 probabilities tie often enough to make
    top-k choices flaky. The top-k weights are renormalised to sum to 1 (so with K=1 the router
    learns only from the aux loss, as in Switch). The load-balancing loss is
    ``E * sum_e f_e * P_e`` with f_e the fraction of the T*K assignments sent to e (not
    differentiable) and P_e the mean router probability of e (carries the gradient); it is 1
    for perfectly uniform routing.
    """
    T, E = logits_TE.shape
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    top_w_TK, idx_TK = torch.topk(probs_TE, top_k, dim=-1)
    weight_TK = top_w_TK / top_w_TK.sum(dim=-1, keepdim=True)
    counts_E = expert_histogram(idx_TK, E)
    frac_E = counts_E.to(probs_TE.dtype) / max(T * top_k, 1)
    aux_loss = E * torch.sum(frac_E * probs_TE.mean(dim=0))
    return Routing(idx_TK, weight_TK, aux_loss, counts_E.detach())


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots per expert: ``ceil(capacity_factor * T * K / E)`` (the fair share times the factor)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


class Assignments(NamedTuple):
    """The T*K (token, expert) assignments sorted by expert, and by token inside one expert."""

    expert_A: torch.Tensor   # long, global expert ids, non-decreasing
    token_A: torch.Tensor    # long, the token each row comes from
    weight_A: torch.Tensor   # fp32 routing weight (0 for an assignment dropped by the capacity)
    counts_E: torch.Tensor   # long (E,), rows per expert (dropped ones included)
    dropped: torch.Tensor    # long 0-dim, assignments over capacity


def flatten_assignments(topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor, num_experts: int,
                        capacity_factor: Optional[float]) -> Assignments:
    """Flatten the T*K assignments and sort them by expert; apply the capacity limit.

    Stable sort of the row-major T*K list: expert-major, token order inside an expert. With a
    capacity, an expert keeps its first ``capacity`` assignments in token order and the rest get
    weight 0: a deterministic rule that needs no per-token Python, gives the same choice on every
    dispatcher, and keeps every shape fixed (no host sync). A dropped row is still computed, and
    contributes exactly nothing. ``weight_A`` keeps the router's autograd graph.
    """
    T, K = topk_idx_TK.shape
    flat_A = topk_idx_TK.reshape(-1)
    order_A = torch.argsort(flat_A, stable=True)
    expert_A = flat_A[order_A]
    token_A = torch.div(order_A, K, rounding_mode="floor")
    weight_A = topk_w_TK.reshape(-1)[order_A]
    counts_E = expert_histogram(expert_A, num_experts)
    dropped = torch.zeros((), dtype=torch.long, device=expert_A.device)
    if capacity_factor is not None:
        cap = expert_capacity(capacity_factor, T, K, num_experts)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_A = torch.arange(expert_A.numel(), device=expert_A.device) - starts_E[expert_A]
        keep_A = rank_A < cap
        weight_A = torch.where(keep_A, weight_A, torch.zeros_like(weight_A))
        dropped = (~keep_A).sum()
    return Assignments(expert_A, token_A, weight_A, counts_E, dropped)


def combine(y_AD: torch.Tensor, a: Assignments, like_TD: torch.Tensor) -> torch.Tensor:
    """Scale each row by its routing weight and sum the rows of each token: (T, D)."""
    y_AD = y_AD * a.weight_A.unsqueeze(1).to(y_AD.dtype)
    # In the experts' dtype: under autocast that is the autocast dtype, not the fp32 of the input.
    return torch.zeros(like_TD.shape, dtype=y_AD.dtype, device=like_TD.device).index_add_(0, a.token_A, y_AD)


class LocalDispatcher:
    """Sorted, grouped dispatch to the experts held by this process (all E of them).

    Tokens are gathered once into expert-major order, the experts run on them as grouped GEMMs,
    outputs are scaled by the routing weight and ``index_add_``-ed back. Cost is O(T*K*D) memory
    plus the expert FLOPs, never a dense T x E x D tensor, and no host sync.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor,
                 experts: GroupedExperts, capacity_factor: Optional[float],
                 drop_base: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if experts.num_local != self.num_experts:
            raise ValueError(f"LocalDispatcher needs all {self.num_experts} experts in the layer, found "
                             f"{experts.num_local} ({experts.ids}); expert parallelism installs its own dispatcher")
        a = flatten_assignments(topk_idx_TK, topk_w_TK, self.num_experts, capacity_factor)
        key_A = None if drop_base is None else assignment_keys(drop_base, a.token_A, a.expert_A, self.num_experts)
        y_AD = experts(x_TD.index_select(0, a.token_A), a.counts_E, key_A)
        return combine(y_AD, a, x_TD), a.dropped


class MoEFeedForward(nn.Module):
    """Routed experts (plus an optional always-on shared expert) in place of a dense MLP.

    ``forward(x_BTD) -> (y_BTD, aux_loss)``. After each forward ``last_tokens_per_expert`` (E,)
    and ``last_dropped`` (0-dim) hold detached routing stats for metrics, on the device.
    ``capacity_factor`` (None = dropless) and ``dispatcher`` are set from outside by the trainer /
    expert parallelism.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.noise_std = cfg.num_experts, cfg.top_k, cfg.router_noise_std
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.d_model, cfg.d_ff, cfg.expert_type, cfg.num_experts, cfg.dropout)
        self.shared_expert = Expert(cfg.d_model, cfg.d_ff, cfg.expert_type, cfg.dropout) if cfg.shared_expert else None
        self.dispatcher = LocalDispatcher(cfg.num_experts)
        self.capacity_factor: Optional[float] = None
        self.last_tokens_per_expert: Optional[torch.Tensor] = None
        self.last_dropped: Optional[torch.Tensor] = None

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        # Call the module (not F.linear on its weight) so ZeRO-3 hooks gather the router weight.
        logits_TE = self.router(x_TD).float()
        if self.training and self.noise_std > 0:
            # Default RNG: seeded runs are reproducible and checkpoint recompute replays it.
            logits_TE = logits_TE + torch.randn_like(logits_TE) * self.noise_std
        r = route(logits_TE, self.top_k)
        # The experts' dropout keys come from this rank's generator, after the noise (model/dropout.py).
        drop_base = draw_base(x_TD.device) if self.training and self.experts.dropout > 0 else None
        y_TD, dropped = self.dispatcher(x_TD, r.idx_TK, r.weight_TK, self.experts, self.capacity_factor, drop_base)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        self.last_tokens_per_expert, self.last_dropped = r.tokens_per_expert_E, dropped.detach()
        return y_TD.view(B, T, D), r.aux_loss
