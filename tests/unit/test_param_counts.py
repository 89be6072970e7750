"""param_counts: the config-only counts equal what built models hold, role by role; the
torch-free modules stay torch-free (``moe-plan`` imports them)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moe_dist import model as lm
from moe_dist.config import SEED_MODEL_OPTIONS, ModelConfig, get_preset
from moe_dist.plan.param_counts import count_params

TINY = dict(vocab_size=61, d_model=16, n_layers=2, n_heads=4, d_ff=24, num_experts=4, top_k=2, max_seq_len=32)


def _numel(model: torch.nn.Module, part: str) -> int:
    """Parameters whose name contains ``part`` (a tied weight once)."""
    return sum(p.numel() for n, p in model.named_parameters() if part in n)


@pytest.mark.parametrize("kw", [
    {}, {"tie_embeddings": False}, {"shared_expert": True}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "top_k": 1},
    {"expert_type": "silu_mlp"}, {"expert_type": "silu_mlp", "shared_expert": True, "tie_embeddings": False},
    {"num_experts": 8, "top_k": 3, "n_layers": 3, "n_heads": 2, "n_kv_heads": 1},
    {"fused_qkv": True}, {"fused_qkv": True, "n_kv_heads": 2}, SEED_MODEL_OPTIONS,
])
def test_counts_match_built_model(kw):
    cfg = ModelConfig(**{**TINY, **kw})
    model = lm.build(cfg, device="meta")
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.embedding == _numel(model, "embed.")
    assert pc.lm_head == (0 if cfg.tie_embeddings else _numel(model, "lm_head."))
    assert pc.attention == _numel(model, ".attn.")
    assert pc.norms == _numel(model, "norm.")
    assert pc.router == _numel(model, ".router.")
    assert pc.experts == _numel(model, ".experts.")
    assert pc.shared_expert == _numel(model, ".shared_expert.")
    per_expert = _numel(model.layers[0].ffn.experts, "") // cfg.num_experts  # stacked: E rows per matrix
    assert pc.active == pc.total - pc.experts + cfg.n_layers * cfg.top_k * per_expert
    shapes = sorted(p.numel() for p in model.parameters())
    assert sorted(n for n, k in pc.tensors for _ in range(k)) == shapes
    assert pc.largest_module == max(shapes)


@pytest.mark.parametrize("name", ["tiny", "4090", "b200", "18b"])
def test_preset_counts(name):
    pc = count_params(get_preset(name).model)
    assert 0 < pc.active < pc.total
    if name == "18b":
        assert 18.5e9 < pc.total < 18.7e9                      # "~18.6B parameters" (config.py)
        assert pc.experts == 16 * 8 * 3 * 4096 * 11008
        assert pc.largest_module == 8 * 4096 * 11008  # a layer's stacked expert matrix (E, F, D) is the largest


@pytest.mark.parametrize("module", ["moe_dist.plan.param_counts", "moe_dist.parallel.dims", "moe_dist.plan.cli"])
def test_imports_no_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0, f"{module} imports torch"
