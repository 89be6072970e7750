"""Seed-format checkpoints built from the facts of issue 22 (no seed code): ``torch.save`` of
``{step, model_state_dict, optimizer_states: [Muon, AdamW], scheduler_states: [LambdaLR x2], config,
metrics}``, ``config`` a dataclass whose class is the seed's ``MoE4090Config`` / ``MoE18BConfig``."""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from pathlib import Path
from typing import Optional

import torch

from .seed_reference import seed_state

CLASSES = {"4090": ("experiments.exp4_18b_moe_training.config_4090", "MoE4090Config"),
           "b200": ("experiments.exp4_18b_moe_training.config_18b", "MoE18BConfig")}
DIMS = dict(d_model=32, n_layers=2, n_heads=4, d_ff=48, num_experts=4, vocab_size=320)


def seed_lambda(step: int, max_steps: int) -> float:
    """The seed's LR factor: linear warmup over max_steps // 20 from 0, then cosine down to 0.1x."""
    warmup = max_steps // 20
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (max_steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def seed_config_class(kind: str) -> type:
    module, name = CLASSES[kind]

    @dataclasses.dataclass
    class Cfg:
        d_model: int = 32
        n_heads: int = 4
        n_layers: int = 2
        d_ff: int = 48
        num_experts: int = 4
        expert_top_k: int = 2
        vocab_size: int = 320
        max_seq_len: int = 32
        batch_size: int = 2
        gradient_accumulation_steps: int = 2
        max_steps: int = 400
        muon_lr: float = 0.01
        dropout: float = 0.1
        load_balancing_weight: float = 0.01
        weight_decay: float = 0.1
        grad_clip: float = 1.0

        def __post_init__(self):
            self.d_k = self.d_model // self.n_heads  # a derived field, as the seed's config has

    Cfg.__module__, Cfg.__name__, Cfg.__qualname__ = module, name, name
    return Cfg


def _muon_names(L: int, E: int) -> list[str]:
    out = []
    for i in range(L):
        b = f"transformer_blocks.{i}"
        out += [f"{b}.attention.qkv.weight", f"{b}.attention.w_o.weight"]
        for e in range(E):
            out += [f"{b}.feed_forward.experts.{e}.linear1.weight", f"{b}.feed_forward.experts.{e}.linear2.weight"]
        out.append(f"{b}.feed_forward.router.gate.weight")
    return out


def _adam_names(L: int) -> list[str]:
    return ["token_embedding.weight"] + [f"transformer_blocks.{i}.norm{j}.weight" for i in range(L)
                                         for j in (1, 2)] + ["norm.weight"]


def make_seed_checkpoint(path: Path, kind: str = "4090", opt_steps: int = 30, idle: tuple = ((1, 3),),
                         seed: int = 0, extra: Optional[object] = None, **cfg_kw) -> dict:
    """Write a seed checkpoint at ``path``; returns what was written (tensors by seed name, for checks).
    ``idle``: (layer, expert) pairs that never got a token (no Muon state). ``extra``: an object stored
    under metrics['extra'] (to provoke the safe loader)."""
    Cfg = seed_config_class(kind)
    cfg = Cfg(**cfg_kw)
    d, L, H, F, E, V = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.num_experts, cfg.vocab_size
    sd = seed_state(d, L, H, F, E, V, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    muon_names, adam_names = _muon_names(L, E), _adam_names(L)
    idle_names = {f"transformer_blocks.{i}.feed_forward.experts.{e}.linear{j}.weight" for i, e in idle for j in (1, 2)}
    muon_state = {pos: {"momentum_buffer": torch.randn(sd[n].shape, generator=g) * 1e-3}
                  for pos, n in enumerate(muon_names) if n not in idle_names}
    adam_state = {pos: {"step": torch.tensor(float(opt_steps)), "exp_avg": torch.randn(sd[n].shape, generator=g) * 1e-3,
                        "exp_avg_sq": torch.rand(sd[n].shape, generator=g) * 1e-6} for pos, n in enumerate(adam_names)}
    f = seed_lambda(opt_steps, cfg.max_steps)
    muon_lr, adam_lr = cfg.muon_lr, cfg.muon_lr * 0.1
    muon_groups = [{"lr": muon_lr * f, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "initial_lr": muon_lr,
                    "params": list(range(len(muon_names)))}]
    adam_groups = [{"lr": adam_lr * f, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": cfg.weight_decay,
                    "amsgrad": False, "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
                    "fused": None, "initial_lr": adam_lr, "params": list(range(len(adam_names)))}]
    sched = [{"base_lrs": [lr], "last_epoch": opt_steps, "_step_count": opt_steps + 1, "_get_lr_called_within_step": False,
              "_last_lr": [lr * f], "lr_lambdas": [None]} for lr in (muon_lr, adam_lr)]
    metrics = {"val_loss": 4.25, "val_accuracy": 0.31, "val_perplexity": math.exp(4.25)}
    if extra is not None:
        metrics["extra"] = extra
    ckpt = {"step": opt_steps * cfg.gradient_accumulation_steps, "model_state_dict": sd,
            "optimizer_states": [{"state": muon_state, "param_groups": muon_groups},
                                 {"state": adam_state, "param_groups": adam_groups}],
            "scheduler_states": sched, "config": cfg, "metrics": metrics}
    # The class must be importable by name for pickling; it is removed again so that loading cannot import it.
    module, _ = CLASSES[kind]
    parts = module.split(".")
    added = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    setattr(sys.modules[module], Cfg.__name__, Cfg)
    try:
        torch.save(ckpt, path)
    finally:
        for name in added:
            del sys.modules[name]
    return {"model": sd, "muon_names": muon_names, "adam_names": adam_names, "muon_state": muon_state,
            "adam_state": adam_state, "idle": idle_names, "cfg": cfg, "lrs": (muon_lr * f, adam_lr * f),
            "next_lr_factor": f, "ckpt": ckpt}
