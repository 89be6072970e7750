"""Mixture-of-experts feed-forward: router, experts, and the local (single-process) dispatcher.

The layer is split in three so that parallelism can be applied from outside:

* the **router** (a bias-free ``nn.Linear`` named ``router``) scores experts; :func:`route` turns
  the scores into top-k choices, renormalised weights, the load-balancing loss and counts;
* the **experts** live in an ``nn.ModuleDict`` keyed by the *global* expert index ("0".."E-1"),
  so parameter names carry the expert's identity. Expert parallelism deletes the keys a rank
  does not own; nothing here assumes all E keys are present;
* the **dispatcher** is a plain object (``layer.dispatcher``), not a submodule, so expert
  parallelism can swap :class:`LocalDispatcher` for an all-to-all one without touching
  parameters. Both share :func:`flatten_assignments`, which fixes the order and the capacity
  rule, so dropping decisions are identical with and without expert parallelism.

Legend: B batch, T tokens (B*seq in the layer), D d_model, F d_ff, E global experts,
K top-k, A kept (token, expert) assignments (T*K when dropless), N rows given to one expert.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class Expert(nn.Module):
    """One expert MLP. 'swiglu': down(silu(gate(x)) * up(x)); 'silu_mlp': down(silu(up(x)))."""

    def __init__(self, d_model: int, d_ff: int, expert_type: str) -> None:
        super().__init__()
        if expert_type not in ("swiglu", "silu_mlp"):
            raise ValueError(f"expert_type: expected 'swiglu' or 'silu_mlp', found {expert_type!r}")
        self.w_gate = nn.Linear(d_model, d_ff, bias=False) if expert_type == "swiglu" else None
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        h_NF = F.silu(self.w_gate(x_ND)) * self.w_up(x_ND) if self.w_gate is not None else F.silu(self.w_up(x_ND))
        return self.w_down(h_NF)


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
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E)
    frac_E = counts_E.to(probs_TE.dtype) / max(T * top_k, 1)
    aux_loss = E * torch.sum(frac_E * probs_TE.mean(dim=0))
    return Routing(idx_TK, weight_TK, aux_loss, counts_E.detach())


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots per expert: ``ceil(capacity_factor * T * K / E)`` (the fair share times the factor)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def flatten_assignments(
    topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor, num_experts: int, capacity_factor: Optional[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Flatten the T*K assignments and sort them by expert; apply the capacity limit.

    Returns ``(expert_A, token_A, weight_A, dropped)``: kept assignments in expert-major order
    and, inside one expert, in token order (stable sort of the row-major T*K list). With a
    capacity, an expert keeps its first ``capacity`` assignments in token order and drops the
    rest: a deterministic rule that needs no per-token Python and gives the same choice on every
    dispatcher. ``weight_A`` keeps the router's autograd graph.
    """
    T, K = topk_idx_TK.shape
    flat_A = topk_idx_TK.reshape(-1)
    order_A = torch.argsort(flat_A, stable=True)
    expert_A = flat_A[order_A]
    token_A = torch.div(order_A, K, rounding_mode="floor")
    weight_A = topk_w_TK.reshape(-1)[order_A]
    dropped = 0
    if capacity_factor is not None:
        cap = expert_capacity(capacity_factor, T, K, num_experts)
        counts_E = torch.bincount(expert_A, minlength=num_experts)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_A = torch.arange(expert_A.numel(), device=expert_A.device) - starts_E[expert_A]
        keep_A = rank_A < cap
        dropped = int(expert_A.numel() - int(keep_A.sum()))
        if dropped:
            expert_A, token_A, weight_A = expert_A[keep_A], token_A[keep_A], weight_A[keep_A]
    return expert_A, token_A, weight_A, dropped


class LocalDispatcher:
    """Sorted, grouped dispatch to the experts held by this process.

    Tokens are gathered once into expert-major order, each present expert runs one matmul chain
    on its contiguous slice, outputs are scaled by the routing weight and ``index_add_``-ed back.
    Cost is O(T*K*D) memory plus the expert FLOPs, never a dense T x E x D tensor.

    Every present expert runs, on an empty slice if it got no tokens: its weights then receive
    an exact zero gradient instead of ``None``. That keeps the set of parameters with gradients
    the same on every step and every rank, which DeepSpeed's ZeRO gradient hooks and ZeRO-3's
    parameter gathering (collective, so all ranks must visit the same modules) rely on.

    ``num_experts`` (global E) sets the capacity rule; when None it is inferred from the
    largest key present. Assignments must only name experts present in ``experts``.
    """

    def __init__(self, num_experts: Optional[int] = None) -> None:
        self.num_experts = num_experts

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor,
                 experts: nn.ModuleDict, capacity_factor: Optional[float]) -> tuple[torch.Tensor, int]:
        ids = sorted(int(k) for k in experts.keys())
        E = self.num_experts if self.num_experts is not None else (ids[-1] + 1 if ids else 0)
        expert_A, token_A, weight_A, dropped = flatten_assignments(topk_idx_TK, topk_w_TK, E, capacity_factor)
        counts = torch.bincount(expert_A, minlength=E).tolist()  # the one host sync: slice bounds
        starts = [0] * (E + 1)
        for e in range(E):
            starts[e + 1] = starts[e] + counts[e]
        if sum(counts[e] for e in ids) != expert_A.numel():
            missing = sorted(set(e for e in range(E) if counts[e]) - set(ids))
            raise KeyError(f"tokens routed to experts {missing} that are not in this layer's experts {ids}")

        x_AD = x_TD.index_select(0, token_A)
        y_AD = torch.cat([experts[str(e)](x_AD[starts[e]:starts[e + 1]]) for e in ids], 0) if ids else x_AD
        y_AD = y_AD * weight_A.unsqueeze(1).to(y_AD.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)
        return y_TD, dropped


class MoEFeedForward(nn.Module):
    """Routed experts (plus an optional always-on shared expert) in place of a dense MLP.

    ``forward(x_BTD) -> (y_BTD, aux_loss)``. After each forward ``last_tokens_per_expert`` (E,)
    and ``last_dropped`` hold detached routing stats for metrics. ``capacity_factor`` (None =
    dropless) and ``dispatcher`` are set from outside by the trainer / expert parallelism.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.noise_std = cfg.num_experts, cfg.top_k, cfg.router_noise_std
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleDict(
            {str(e): Expert(cfg.d_model, cfg.d_ff, cfg.expert_type) for e in range(cfg.num_experts)})
        self.shared_expert = Expert(cfg.d_model, cfg.d_ff, cfg.expert_type) if cfg.shared_expert else None
        self.dispatcher = LocalDispatcher(cfg.num_experts)
        self.capacity_factor: Optional[float] = None
        self.last_tokens_per_expert: Optional[torch.Tensor] = None
        self.last_dropped: int = 0

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        # Call the module (not F.linear on its weight) so ZeRO-3 hooks gather the router weight.
        logits_TE = self.router(x_TD).float()
        if self.training and self.noise_std > 0:
            # Default RNG: seeded runs are reproducible and checkpoint recompute replays it.
            logits_TE = logits_TE + torch.randn_like(logits_TE) * self.noise_std
        r = route(logits_TE, self.top_k)
        y_TD, dropped = self.dispatcher(x_TD, r.idx_TK, r.weight_TK, self.experts, self.capacity_factor)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        self.last_tokens_per_expert, self.last_dropped = r.tokens_per_expert_E, int(dropped)
        return y_TD.view(B, T, D), r.aux_loss
