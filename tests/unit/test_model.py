"""Unit tests of moe_dist.model: routing, dispatch, the LM, parameter counts. CPU, tiny configs.

Legend: T tokens, D d_model, E experts, K top-k, V vocabulary.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from moe_dist.config import ModelConfig
from moe_dist import model as lm
from moe_dist.model import LocalDispatcher, MoE18BLLM, MoEFeedForward, MoETransformer, flatten_assignments, route


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=16, n_layers=2, n_heads=4, d_ff=24, num_experts=4, top_k=2, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return lm.build(cfg)


# --------------------------------------------------------------------------- the LM
def test_shapes_and_names():
    cfg = tiny()
    model = build(cfg)
    logits, aux = model(torch.randint(0, cfg.vocab_size, (3, 10)))
    assert logits.shape == (3, 10, cfg.vocab_size) and aux.ndim == 0
    names = dict(model.named_parameters())
    assert names["layers.1.ffn.experts.w_down"].shape == (cfg.num_experts, cfg.d_model, cfg.d_ff)  # stacked
    assert "layers.0.ffn.router.weight" in names
    assert "lm_head.weight" not in names  # tied: one parameter, named once
    sd = model.state_dict()  # every expert under its own global name, as checkpoints store them
    assert torch.equal(sd["layers.1.ffn.experts.3.w_down.weight"], names["layers.1.ffn.experts.w_down"][3])
    assert "layers.1.ffn.experts.w_down" not in sd
    assert not any("rope" in k for k in model.state_dict())
    assert len(list(model.moe_layers())) == cfg.n_layers and MoE18BLLM is MoETransformer


def test_return_aux_loss_false_gives_none():
    cfg = tiny()
    logits, aux = build(cfg)(torch.randint(0, cfg.vocab_size, (2, 8)), return_aux_loss=False)
    assert aux is None and logits.shape == (2, 8, cfg.vocab_size)


@pytest.mark.parametrize("kv", [None, 2])
def test_causal(kv):
    cfg = tiny(n_kv_heads=kv)
    model = build(cfg).eval()
    tok = torch.randint(0, cfg.vocab_size, (2, 12))
    t = 5
    changed = tok.clone()
    changed[:, t + 1:] = torch.randint(0, cfg.vocab_size, (2, 12 - t - 1))
    with torch.no_grad():
        a, _ = model(tok)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_same_seed_bitwise_equal():
    cfg = tiny(shared_expert=True)
    tok = torch.randint(0, cfg.vocab_size, (2, 16))
    outs = []
    for _ in range(2):
        model = build(cfg, seed=7).train()
        torch.manual_seed(3)  # router noise
        outs.append(model(tok))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_gradient_checkpointing_matches():
    cfg = tiny(router_noise_std=0.5)  # large noise: a recompute with other noise would reroute
    tok = torch.randint(0, cfg.vocab_size, (2, 16))
    results = []
    for ckpt in (False, True):
        model = build(cfg, seed=1).train()
        model.gradient_checkpointing = ckpt
        torch.manual_seed(11)
        logits, aux = model(tok)
        loss = nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), tok.reshape(-1)) + aux
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-6, atol=1e-7, msg=n)


def test_bf16_cast_keeps_fp32_rope():
    """A whole-module cast (what DeepSpeed's bf16 set-up does) leaves the rotary tables fp32 and exact."""
    cfg = tiny()
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    before = [t.clone() for t in model.rope(8, tokens.device)]
    model = model.to(torch.bfloat16)
    logits, _ = model(tokens)
    after = model.rope(8, tokens.device)
    assert logits.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in after)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_init_scales_output_projections():
    cfg = tiny(d_model=64, d_ff=128, n_layers=8, init_std=0.02)
    model = build(cfg)
    assert abs(model.layers[0].attn.wq.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].attn.wo.weight.std().item() - 0.02 / 4) < 0.0005
    assert abs(model.layers[0].ffn.experts.w_down[0].std().item() - 0.02 / 4) < 0.0005
    assert torch.equal(model.norm.weight, torch.ones(cfg.d_model))


# --------------------------------------------------------------------------- router
def test_router_topk_hand_case():
    cfg = tiny(d_model=4, n_heads=1, num_experts=4, top_k=2)
    layer = MoEFeedForward(cfg).eval()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))  # logits == x
    x_TD = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    r = route(layer.router(x_TD), cfg.top_k)
    assert r.idx_TK.tolist() == [[0, 1], [2, 3]]
    w0 = math.exp(2) / (math.exp(2) + math.exp(1))
    w1 = math.exp(3) / (math.exp(3) + math.exp(1))
    torch.testing.assert_close(r.weight_TK, torch.tensor([[w0, 1 - w0], [w1, 1 - w1]]))
    assert r.tokens_per_expert_E.tolist() == [1, 1, 1, 1] and not r.tokens_per_expert_E.requires_grad


def test_aux_loss_hand_case():
    # T=3, E=2, K=1: tokens 0 and 2 pick expert 0, token 1 expert 1; probs are .75/.25 (ln 3 apart).
    logits_TE = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    r = route(logits_TE, 1)
    # f = [2/3, 1/3]; P = [(.75 + .25 + .75)/3, (.25 + .75 + .25)/3] = [7/12, 5/12]
    expected = 2 * (2 / 3 * 7 / 12 + 1 / 3 * 5 / 12)
    torch.testing.assert_close(r.aux_loss, torch.tensor(expected))
    torch.testing.assert_close(route(torch.zeros(8, 4), 2).aux_loss, torch.tensor(1.0))  # uniform -> 1


def test_router_noise_only_in_training():
    cfg = tiny(router_noise_std=1.0)
    layer = MoEFeedForward(cfg)
    x = torch.randn(1, 32, cfg.d_model)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.equal(layer(x)[0], layer(x)[0])


# --------------------------------------------------------------------------- dispatch
def one_expert(experts, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of stacked experts, written out: down(silu(gate x) * up x) or down(silu(up x))."""
    up = x_ND @ experts.w_up[e].T
    h = torch.nn.functional.silu(x_ND @ experts.w_gate[e].T) * up if experts.w_gate is not None else \
        torch.nn.functional.silu(up)
    return h @ experts.w_down[e].T


def dense_reference(layer: MoEFeedForward, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert on every token, masked by the routing weights (eval mode: no noise)."""
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    r = route(layer.router(x_TD).float(), layer.top_k)
    mask_TE = torch.zeros(x_TD.shape[0], layer.num_experts).scatter(1, r.idx_TK, r.weight_TK)
    y_TD = sum(mask_TE[:, e:e + 1] * one_expert(layer.experts, e, x_TD) for e in range(layer.num_experts))
    if layer.shared_expert is not None:
        y_TD = y_TD + layer.shared_expert(x_TD)
    return y_TD.view_as(x_BTD), r.aux_loss


@pytest.mark.parametrize("expert_type", ["swiglu", "silu_mlp"])
@pytest.mark.parametrize("shared", [False, True])
def test_dispatch_matches_dense(expert_type, shared):
    cfg = tiny(expert_type=expert_type, shared_expert=shared, num_experts=5, top_k=2)
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg).eval()
    x = torch.randn(2, 9, cfg.d_model)
    grads = []
    for fn in (layer, lambda t: dense_reference(layer, t)):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, aux = fn(xi)
        (y.square().sum() + aux).backward()
        grads.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y0, gx0, gp0), (y1, gx1, gp1) = grads
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(gx0, gx1)
    for n in gp0:
        torch.testing.assert_close(gp0[n], gp1[n], msg=n)
    assert layer.last_tokens_per_expert.sum().item() == 18 * 2 and layer.last_dropped == 0


def test_idle_expert_gets_zero_grad():
    cfg = tiny(num_experts=4, top_k=1)
    layer = MoEFeedForward(cfg).eval()
    x_TD = torch.randn(6, cfg.d_model, requires_grad=True)
    idx_TK = torch.tensor([[0], [1], [0], [1], [0], [1]])
    y, dropped = layer.dispatcher(x_TD, idx_TK, torch.ones(6, 1), layer.experts, None)
    y.sum().backward()
    g = layer.experts.w_up.grad  # stacked: row e is expert e
    assert g is not None and torch.count_nonzero(g[2:]) == 0
    assert torch.count_nonzero(g[0]) > 0


def test_capacity_drops_later_tokens():
    # E=2, K=2, T=4, factor 0.75 -> capacity ceil(0.75*4*2/2) = 3 slots per expert.
    idx_TK = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])
    w_TK = torch.full((4, 2), 0.5)
    a = flatten_assignments(idx_TK, w_TK, 2, 0.75)
    kept = a.weight_A > 0  # a dropped assignment keeps its row (static shapes) with weight 0
    assert a.dropped == 2 and a.counts_E.tolist() == [4, 4]
    assert a.expert_A[kept].tolist() == [0, 0, 0, 1, 1, 1] and a.token_A[kept].tolist() == [0, 1, 2, 0, 1, 2]
    # capacity 1 with K=1: expert 0 gets tokens 0,2,3 and keeps only token 0
    a = flatten_assignments(torch.tensor([[0], [1], [0], [0]]), torch.ones(4, 1), 2, 0.5)
    kept = a.weight_A > 0
    assert (a.expert_A[kept].tolist(), a.token_A[kept].tolist(), int(a.dropped)) == ([0, 1], [0, 1], 2)


def test_capacity_in_dispatcher_zeroes_dropped_tokens():
    cfg = tiny(num_experts=2, top_k=1)
    layer = MoEFeedForward(cfg)
    x_TD = torch.randn(4, cfg.d_model)
    idx_TK = torch.tensor([[0], [1], [0], [0]])
    y, dropped = LocalDispatcher(2)(x_TD, idx_TK, torch.ones(4, 1), layer.experts, 1.0)  # capacity 2
    full, _ = LocalDispatcher(2)(x_TD, idx_TK, torch.ones(4, 1), layer.experts, None)
    assert dropped == 1
    assert torch.equal(y[3], torch.zeros(cfg.d_model))
    torch.testing.assert_close(y[:3], full[:3])


def test_layer_records_drops():
    cfg = tiny(num_experts=4, top_k=2)
    layer = MoEFeedForward(cfg).eval()
    layer.capacity_factor = 0.25  # capacity ceil(0.25*32*2/4) = 4 of 16 average
    layer(torch.randn(2, 16, cfg.d_model))
    assert layer.last_dropped > 0 and layer.last_tokens_per_expert.sum().item() == 64


def test_subset_of_experts():
    """Expert parallelism keeps a contiguous range of rows: the kept experts compute exactly what they
    did in the full stack, and keep their global names in state_dict (and only theirs)."""
    cfg = tiny(num_experts=8, top_k=2)
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg)
    full = {k: v.clone() for k, v in layer.experts.state_dict().items()}
    x_ND = torch.randn(5, cfg.d_model)
    ref = [one_expert(layer.experts, e, x_ND) for e in (2, 3)]
    layer.experts.keep(range(2, 4))
    assert layer.experts.ids == range(2, 4) and layer.experts.w_up.shape[0] == 2
    sd = layer.experts.state_dict()
    assert sorted(sd) == sorted(k for k in full if k.split(".")[0] in ("2", "3"))
    assert all(torch.equal(sd[k], full[k]) for k in sd)
    y = layer.experts(torch.cat([x_ND, x_ND]), torch.tensor([5, 5]))
    torch.testing.assert_close(y, torch.cat(ref))
    with pytest.raises(ValueError, match="contiguous sub-range"):
        layer.experts.keep(range(0, 2))
    with pytest.raises(ValueError, match="needs all 8 experts"):  # EP installs its own dispatcher
        LocalDispatcher(8)(x_ND, torch.tensor([[2, 3]] * 5), torch.ones(5, 2), layer.experts, None)
    # Loading a per-expert state dict stacks it back (what every loader of a checkpoint does).
    layer.experts.load_state_dict({k: torch.zeros_like(v) for k, v in sd.items()})
    assert torch.count_nonzero(layer.experts.w_down) == 0


def test_model_package_has_no_parallel_imports():
    banned = re.compile(r"^\s*(import|from)\s+(torch\.distributed|deepspeed|accelerate)\b", re.M)
    root = Path(__file__).resolve().parents[2] / "moe_dist" / "model"
    for f in root.glob("*.py"):
        assert not banned.search(f.read_text()), f"{f} imports a parallel library"
