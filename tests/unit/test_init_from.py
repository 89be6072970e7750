"""--init-from: the architecture check and the readers (a .pt and a --format hf export) fill a fresh model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moe_dist.run import init_from
from moe_dist.checkpoint.errors import CheckpointError
from moe_dist.config import apply_overrides, get_preset
from moe_dist.export.hf import HF_MARKER, hf_tensor_name, mixtral_config
from moe_dist import model as lm

SMALL = {"model.d_model": 32, "model.n_heads": 2, "model.d_ff": 32, "model.max_seq_len": 32, "train.seq_len": 32}


def _model(cfg, seed):
    torch.manual_seed(seed)
    return lm.build(cfg.model)


def _same(a, b):
    return all(torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items())


def test_pt_source_fills_a_fresh_model(tmp_path):
    cfg = apply_overrides(get_preset("tiny"), SMALL)
    src = _model(cfg, 1)
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": src.state_dict(), "config": cfg.to_dict(), "step": 7}, path)
    init_from.check(str(path), cfg.model)
    dst = _model(cfg, 2)
    assert not _same(src, dst)
    init_from.load(str(path), dst)
    assert _same(src, dst)


def test_other_architecture_is_refused_naming_the_fields(tmp_path):
    cfg = apply_overrides(get_preset("tiny"), SMALL)
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": _model(cfg, 1).state_dict(), "config": cfg.to_dict()}, path)
    other = apply_overrides(cfg, {"model.num_experts": 4, "model.n_layers": 3}).model
    with pytest.raises(CheckpointError) as err:
        init_from.check(str(path), other)
    msg = str(err.value)
    assert msg.startswith(f"--init-from {path}: checkpoint of another architecture; differing fields: ")
    assert "model.n_layers: saved 2, requested 3" in msg and "model.num_experts: saved 8, requested 4" in msg
    # a training-only field (router noise) is not an architecture
    init_from.check(str(path), apply_overrides(cfg, {"model.router_noise_std": 0.0}).model)
    with pytest.raises(CheckpointError, match=r"^--init-from .*nope.pt: no such file or folder"):
        init_from.check(str(tmp_path / "nope.pt"), cfg.model)


def test_hf_export_source(tmp_path):
    cfg = apply_overrides(get_preset("tiny"), SMALL)
    src = _model(cfg, 1)
    seen, tensors = set(), {}
    for name, t in src.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            tensors[hf_tensor_name(name)] = t.detach().clone().contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(mixtral_config(cfg.model, torch.float32, 0, {"step": 1})))
    assert HF_MARKER in json.loads((tmp_path / "config.json").read_text())
    init_from.check(str(tmp_path), cfg.model)
    dst = _model(cfg, 2)
    init_from.load(str(tmp_path), dst)
    assert _same(src, dst)
    with pytest.raises(CheckpointError, match=r"differing fields: model.d_model: saved 32, requested 64"):
        init_from.check(str(tmp_path), apply_overrides(cfg, {"model.d_model": 64}).model)
