"""Optimizer grouping and the LR schedule (counted in optimizer steps)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist.config import ModelConfig, TrainConfig
from moe_dist import model as lm
from moe_dist.run.optim import LRSchedule, param_groups, tag_parameters, uses_muon


@pytest.mark.parametrize("tie", [True, False])
def test_every_param_in_exactly_one_group_and_muon_rule(tie):
    model = lm.build(ModelConfig(d_model=32, d_ff=32, n_heads=2, n_layers=2, num_experts=4,
                                       tie_embeddings=tie, shared_expert=True))
    tag_parameters(model)
    groups = param_groups(model, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    named = dict(model.named_parameters())
    muon = {n for n, p in named.items() if p.use_muon}
    assert not any("embed" in n or "lm_head" in n for n in muon)
    stacked = {n for n in named if ".experts." in n}
    assert all(named[n].ndim == 2 for n in muon - stacked) and all(named[n].ndim == 3 for n in stacked)
    # DeepSpeed's Muon orthogonalises a tensor tagged is_expert_group per leading index (per expert).
    assert {n for n, p in named.items() if p.is_expert_group} == stacked <= muon
    assert any(".router." in n for n in muon) and any(".experts." in n for n in muon)
    assert {n for n, p in named.items() if p.ndim == 1}.isdisjoint(muon)  # norms go to AdamW
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_schedule_warmup_and_cosine_in_optimizer_steps():
    s = LRSchedule.from_config(TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1, muon_lr=0.02,
                                           adamw_lr=1e-3))
    assert s.factor(0) == pytest.approx(0.1) and s.factor(9) == pytest.approx(1.0)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(110) == pytest.approx(0.1) and s.factor(500) == pytest.approx(0.1)
    groups = [{"use_muon": True}, {"use_muon": False}]
    s.apply(groups, 60)
    assert groups[0]["lr"] == pytest.approx(0.02 * 0.55) and groups[1]["lr"] == pytest.approx(1e-3 * 0.55)
    s.apply(groups, 60, all_adamw=True)
    assert groups[0]["lr"] == pytest.approx(1e-3 * 0.55)
    assert math.isfinite(LRSchedule(0, 0, 0.0, 1.0, 1.0).factor(0))


def test_uses_muon_matches_deepspeed_rule():
    import torch
    assert uses_muon("layers.0.attn.wq.weight", torch.zeros(2, 2))
    assert not uses_muon("embed.weight", torch.zeros(2, 2))
    assert not uses_muon("layers.0.attn_norm.weight", torch.zeros(2))


def test_deepspeed_torch_adamw_runs_fused_on_cpu():
    """DeepSpeed builds torch's AdamW for our CPU runs with ``foreach`` only; the engine switches its groups
    to the fused kernel, which takes the same step (to fp32 rounding) in one pass instead of five temporaries."""
    from types import SimpleNamespace

    from moe_dist.parallel.deepspeed.engine import prefer_fused_adamw

    torch.manual_seed(0)
    flat = [torch.nn.Parameter(torch.randn(1000, device="cpu")) for _ in range(2)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in flat]
    fused = torch.optim.AdamW([flat[0], flat[1]], lr=1e-2, weight_decay=0.1, foreach=None)
    plain = torch.optim.AdamW([ref[0], ref[1]], lr=1e-2, weight_decay=0.1, foreach=False)
    assert prefer_fused_adamw(SimpleNamespace(optimizer=SimpleNamespace(optimizer=fused)))
    assert all(g["fused"] and not g["foreach"] for g in fused.param_groups)
    for _ in range(3):
        g = [torch.randn(1000, device="cpu") for _ in range(2)]
        for p, q, gi in zip(flat, ref, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        fused.step()
        plain.step()
    for p, q in zip(flat, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert set(fused.state[flat[0]]) == set(plain.state[ref[0]])  # the same state keys: checkpoints unchanged

    class OtherOptimizer(torch.optim.SGD):  # DeepSpeed's FusedAdam / CPUAdam / Muon are left alone
        pass

    other = OtherOptimizer([torch.nn.Parameter(torch.zeros(3, device="cpu"))], lr=0.1)
    assert not prefer_fused_adamw(SimpleNamespace(optimizer=SimpleNamespace(optimizer=other)))
