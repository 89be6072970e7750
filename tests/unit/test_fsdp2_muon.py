"""The FSDP2 engine's Muon, in one process: its maths against DeepSpeed's and against a dense step."""

from __future__ import annotations

import math
import os

import pytest
import torch

from moe_dist.parallel.fsdp2.muon import ShardedMuon, orthogonalize, shard_rows

SHAPES = [(64, 64), (64, 192), (192, 64), (8, 64)]  # square, wide, tall (expert down), router


@pytest.mark.parametrize("rows, k", [(64, 2), (64, 3), (8, 3), (2, 4), (1, 3)])
def test_shard_rows_is_torch_chunk(rows, k):
    chunks = torch.chunk(torch.empty(rows, 1, device="cpu"), k)
    want = [c.shape[0] for c in chunks] + [0] * (k - len(chunks))
    assert [shard_rows(rows, k, r) for r in range(k)] == want


@pytest.mark.parametrize("shape", SHAPES)
def test_update_matches_deepspeed_muon_within_fp16_rounding(shape):
    """DeepSpeed's muon_update on this CPU: Gram Newton-Schulz in fp16. Ours: fp32. The difference
    is the fp16 rounding of the iteration (measured 3.8e-3 to 5.2e-3 relative, shapes up to
    1280 x 512); a wrong coefficient, scale or orientation would be off by tens of percent."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    muon_update = pytest.importorskip("deepspeed.runtime.zero.muon.original_muon").muon_update
    gen = torch.Generator(device="cpu").manual_seed(0)
    g = torch.randn(shape, generator=gen, device="cpu")
    m = torch.randn(shape, generator=gen, device="cpu")
    with torch._dynamo.config.patch(disable=True):  # DeepSpeed compiles muon_update: ~10 s a shape on CPU
        want = muon_update(g.clone(), m.clone(), beta=0.95).float()
    m2 = m.clone()
    m2.lerp_(g, 0.05)
    got = orthogonalize(g.lerp(m2, 0.95))
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-2, rel
    assert float(got.norm()) == pytest.approx(float(want.norm()), rel=1e-2)


def test_sharded_muon_on_one_rank_is_the_dense_step():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(12, 5, device="cpu"))
    opt = ShardedMuon([{"params": [p], "use_muon": True}], lr=0.1, momentum=0.9, weight_decay=0.5)
    w, m = p.detach().clone(), torch.zeros(12, 5, device="cpu")
    for _ in range(2):
        p.grad = torch.randn(12, 5, device="cpu")
        m = m.lerp(p.grad, 0.1)
        u = p.grad.lerp(m, 0.9)
        a, b, c = 3.4445, -4.7750, 2.0315
        x = u.mT / (u.norm() + 1e-7)
        for _ in range(5):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
        w = w * (1 - 0.1 * 0.5) - 0.1 * x.mT * math.sqrt(12 / 5)
        opt.step()
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m)
    assert set(opt.state[p]) == {"momentum_buffer"}  # DeepSpeed's key, no step: a resume finds the same state


def test_stacked_experts_step_as_one_2d_matrix_each():
    """A stacked expert tensor (E, F, D) steps as E separate 2-D matrices, momentum included: the
    same numbers as E Muon parameters of shape (F, D) (ShardedMuon on one rank)."""
    torch.manual_seed(0)
    E, F, D = 3, 12, 5
    stacked = torch.nn.Parameter(torch.randn(E, F, D, device="cpu"))
    single = [torch.nn.Parameter(stacked.detach()[e].clone()) for e in range(E)]
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.5}
    a = ShardedMuon([{"params": [stacked], "use_muon": True}], **kw)
    b = ShardedMuon([{"params": single, "use_muon": True}], **kw)
    for _ in range(2):
        grad = torch.randn(E, F, D, device="cpu")
        stacked.grad = grad.clone()
        for e, p in enumerate(single):
            p.grad = grad[e].clone()
        a.step()
        b.step()
    for e, p in enumerate(single):
        torch.testing.assert_close(stacked.detach()[e], p.detach(), rtol=0, atol=0)
        torch.testing.assert_close(a.state[stacked]["momentum_buffer"][e], b.state[p]["momentum_buffer"],
                                   rtol=0, atol=0)


def test_deepspeed_muon_update_of_an_expert_group_is_per_expert():
    """DeepSpeed's muon_update with ``is_expert_group`` (what tag_parameters sets on stacked experts)
    equals its 2-D update of each expert, and so does the momentum it leaves."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    muon_update = pytest.importorskip("deepspeed.runtime.zero.muon.original_muon").muon_update
    gen = torch.Generator(device="cpu").manual_seed(1)
    g = torch.randn(4, 48, 16, generator=gen, device="cpu")
    m = torch.randn(4, 48, 16, generator=gen, device="cpu")
    with torch._dynamo.config.patch(disable=True):
        m_stacked = m.clone()
        got = muon_update(g.clone(), m_stacked, beta=0.95, is_expert_group=True).float()
        for e in range(4):
            m_e = m[e].clone()
            want = muon_update(g[e].clone(), m_e, beta=0.95).float()
            torch.testing.assert_close(got[e], want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(m_stacked[e], m_e, rtol=0, atol=0)
