"""The seed options (``config.SEED_MODEL_OPTIONS``) make moe_dist compute the seed trainer's model: eval
logits and the training aux loss equal a reference forward written from the seed's facts
(``tests/seed_reference.py``); dropout replays under activation checkpointing and its expert masks do
not depend on where a row is computed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_dist import model as lm
from moe_dist.config import SEED_MODEL_OPTIONS, ConfigError, ModelConfig, get_preset
from moe_dist.model.dropout import assignment_keys, expert_dropout
from moe_dist.seed.keys import to_our_state

from ..seed_reference import seed_forward, seed_state

DIMS = dict(d_model=32, n_layers=2, n_heads=4, d_ff=48, num_experts=4, top_k=2, vocab_size=97, max_seq_len=64)


def _seed_model(**kw):
    cfg = ModelConfig(**{**DIMS, **SEED_MODEL_OPTIONS, **kw})
    torch.manual_seed(0)
    model = lm.build(cfg)
    sd = seed_state(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.num_experts, cfg.vocab_size)
    model.load_state_dict(to_our_state(sd))
    return model, sd


@pytest.mark.parametrize("T", [7, 64])
def test_eval_logits_equal_the_seed_reference(T):
    model, sd = _seed_model()
    tokens = torch.randint(0, DIMS["vocab_size"], (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, _ = model.eval()(tokens, return_aux_loss=False)
        want = seed_forward(sd, DIMS["n_heads"], DIMS["top_k"], tokens)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("wrong", [{"rope_layout": "half"}, {"norm_eps": 1e-5}, {"embed_scale": False}])
def test_each_option_matters(wrong):
    """The reference comparison above can fail: each seed option alone moves the logits past 1e-5."""
    model, sd = _seed_model(**wrong)
    tokens = torch.randint(0, DIMS["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, _ = model.eval()(tokens, return_aux_loss=False)
        want = seed_forward(sd, DIMS["n_heads"], DIMS["top_k"], tokens)
    assert (got - want).abs().max() > 1e-5


def test_training_aux_loss_is_summed_over_layers():
    model, sd = _seed_model(dropout=0.0, router_noise_std=0.0)
    tokens = torch.randint(0, DIMS["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    logits, aux = model.train()(tokens)
    want_logits, want_aux = seed_forward(sd, DIMS["n_heads"], DIMS["top_k"], tokens, with_aux=True)
    assert (logits - want_logits).abs().max() <= 1e-5
    assert abs(float(aux.detach()) - float(want_aux)) <= 1e-6
    mean_model, _ = _seed_model(dropout=0.0, router_noise_std=0.0, aux_loss_reduction="mean")
    _, aux_mean = mean_model.train()(tokens)
    assert abs(float(aux_mean.detach()) * DIMS["n_layers"] - float(aux.detach())) <= 1e-6


def _loss_and_grads(model, tokens, seed):
    torch.manual_seed(seed)
    logits, aux = model(tokens)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)) + aux
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_dropout_replays_under_activation_checkpointing():
    model, _ = _seed_model(dropout=0.3)
    model.train()
    tokens = torch.randint(0, DIMS["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(4))
    loss0, grads0 = _loss_and_grads(model, tokens, seed=5)
    model.gradient_checkpointing = True
    loss1, grads1 = _loss_and_grads(model, tokens, seed=5)
    assert torch.equal(loss0, loss1)
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n
    other, _ = _loss_and_grads(model, tokens, seed=6)  # another micro-batch seed: other masks
    assert not torch.equal(other, loss0)
    model.eval()
    with torch.no_grad():  # eval: no dropout, no noise, whatever the RNG
        torch.manual_seed(7)
        a, _ = model(tokens)
        torch.manual_seed(8)
        b, _ = model(tokens)
    assert torch.equal(a, b)


def test_expert_mask_depends_on_the_row_key_only():
    g = torch.Generator().manual_seed(9)
    first_T = torch.randint(0, 8, (40,), generator=g)  # top-2 experts of each token: distinct
    token_A, expert_A = torch.arange(40).repeat_interleave(2), torch.stack([first_T, (first_T + 3) % 8], 1).reshape(-1)
    key_A = assignment_keys(torch.tensor(12345), token_A, expert_A, 8)
    assert key_A.unique().numel() == key_A.numel() and bool((key_A >= 0).all())
    h_AF = torch.rand(80, 300, generator=g) + 0.5
    out = expert_dropout(h_AF, key_A, 0.25)
    perm = torch.randperm(80, generator=g)
    assert torch.equal(expert_dropout(h_AF[perm], key_A[perm], 0.25), out[perm])  # any order, any rank
    dropped = float((out == 0).float().mean())
    n = out.numel()
    assert abs(dropped - 0.25) <= 6 * (0.25 * 0.75 / n) ** 0.5  # a Bernoulli(0.25) rate, six sigma
    kept = out != 0
    torch.testing.assert_close(out[kept], h_AF[kept] / 0.75)
    other = expert_dropout(h_AF, assignment_keys(torch.tensor(54321), token_A, expert_A, 8), 0.25)
    assert not torch.equal(other == 0, out == 0)


@pytest.mark.parametrize("name", ["4090", "b200"])
def test_seed_presets_are_the_seed_model(name):
    m = get_preset(name).model
    for k, v in SEED_MODEL_OPTIONS.items():
        assert getattr(m, k) == v, k
    t = get_preset(name).train
    assert t.adam_betas == (0.9, 0.999) and abs(t.adamw_lr - 0.1 * t.muon_lr) < 1e-12


@pytest.mark.parametrize("name", ["tiny", "100m", "18b"])
def test_other_presets_keep_their_choices(name):
    m = get_preset(name).model
    defaults = ModelConfig()
    for k in ("embed_scale", "dropout", "fused_qkv", "rope_layout", "aux_loss_reduction", "scaled_residual_init"):
        assert getattr(m, k) == getattr(defaults, k), k


@pytest.mark.parametrize("field, value, words", [("dropout", 1.0, "model.dropout: expected a rate in [0, 1)"),
                                                  ("rope_layout", "rotate", "model.rope_layout"),
                                                  ("aux_loss_reduction", "max", "model.aux_loss_reduction")])
def test_options_are_validated(field, value, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(")", r"\)")):
        dataclasses.replace(ModelConfig(), **{field: value})


def test_seed_optimizer_options():
    from moe_dist.run.optim import LRSchedule, param_groups, uses_muon

    model, _ = _seed_model()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1, "adamw")
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if not uses_muon(n, p)}
    assert any("norm" in names[id(p)] for p in decay["params"]) and all(uses_muon(names[id(p)], p)
                                                                           for p in no_decay["params"])
    seed = LRSchedule(20, 400, 0.1, 0.01, 0.001, warmup_from_zero=True)
    assert seed.factor(0) == 0.0 and seed.factor(10) == 0.5 and seed.factor(20) == 1.0
    assert LRSchedule(20, 400, 0.1, 0.01, 0.001).factor(0) == 1 / 20


def test_expert_dropout_is_the_same_on_both_kernels():
    from moe_dist.model import GroupedExperts

    torch.manual_seed(10)
    experts = GroupedExperts(16, 24, "silu_mlp", 3, dropout=0.4).train()
    counts = torch.tensor([5, 0, 7])
    x = torch.randn(12, 16)
    key = assignment_keys(torch.tensor(99), torch.arange(12), torch.tensor([0] * 5 + [2] * 7), 3)
    outs = {}
    for kernel in ("grouped", "loop"):
        experts.kernel = kernel
        outs[kernel] = experts(x, counts, key)
    torch.testing.assert_close(outs["grouped"], outs["loop"])
    experts.eval()
    assert torch.equal(experts(x, counts), experts(x, counts))  # eval: no dropout, no key needed
