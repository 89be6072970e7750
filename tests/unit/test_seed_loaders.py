"""Every weights loader takes a seed trainer ``.pt``: ``moe_dist.load_checkpoint`` (the seed's call shape
``(path, model, device) -> (step, config, metrics)``), ``load_model_for_inference``, ``moe-generate``,
``moe-consolidate`` and ``--init-from``; each model then computes the seed reference forward."""

from __future__ import annotations

import pytest
import torch

import moe_dist
from moe_dist import model as lm
from moe_dist.checkpoint.errors import CheckpointError
from moe_dist.config import ModelConfig
from moe_dist.export.consolidate_cli import main as consolidate_main
from moe_dist.export.inference import generate_main
from moe_dist.run import init_from

from ..seed_fixture import make_seed_checkpoint
from ..seed_reference import seed_forward

TOKENS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def seed_pt(tmp_path):
    path = tmp_path / "checkpoint_step_60.pt"
    return path, make_seed_checkpoint(path, opt_steps=30)


def _close_to_seed(model, written):
    with torch.no_grad():
        got, _ = model.eval()(TOKENS, return_aux_loss=False)
    assert (got - seed_forward(written["model"], 4, 2, TOKENS)).abs().max() <= 1e-5


def test_load_checkpoint_and_load_model_for_inference(seed_pt):
    path, written = seed_pt
    model, cfg, step = moe_dist.load_model_for_inference(str(path))
    assert step == 60 and cfg.model.fused_qkv and cfg.model.rope_layout == "interleaved"  # the seed's own step
    _close_to_seed(model, written)
    fresh = lm.build(cfg.model)
    step, config, metrics = moe_dist.load_checkpoint(str(path), fresh, "cpu")
    assert step == 60 and config["model"]["d_model"] == 32 and metrics["val_loss"] == 4.25
    _close_to_seed(fresh, written)


def test_generate_and_consolidate(seed_pt, tmp_path, capsys):
    path, written = seed_pt
    assert generate_main([str(path), "--prompt", "hi", "--max-new-tokens", "4", "--tokenizer", "byte"]) == 0
    assert capsys.readouterr().out.strip()
    out = tmp_path / "seed.pt"
    assert consolidate_main([str(path), "-o", str(out), "-q"]) == 0
    model, _, _ = moe_dist.load_model_for_inference(str(out))
    _close_to_seed(model, written)
    assert consolidate_main([str(path), "--format", "safetensors", "-q"]) == 0  # default: beside the seed file
    assert (tmp_path / "checkpoint_step_60_moe_dist").is_dir()


def test_init_from_a_seed_pt(seed_pt):
    path, written = seed_pt
    _, cfg, _ = moe_dist.load_model_for_inference(str(path))
    init_from.check(str(path), cfg.model)
    model = lm.build(cfg.model)
    init_from.load(str(path), model)
    _close_to_seed(model, written)
    other = ModelConfig(**{**cfg.model.__dict__, "d_ff": 64})
    with pytest.raises(CheckpointError, match="model.d_ff"):
        init_from.check(str(path), other)


class Gadget:
    """Pickled into a .pt that is not a seed checkpoint."""


def test_a_pt_with_another_global_is_refused_naming_it(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"model_state_dict": {}, "config": {}, "gadget": Gadget()}, path)
    with pytest.raises(CheckpointError, match=r"Gadget") as e:
        moe_dist.load_model_for_inference(str(path))
    assert "\n" not in str(e.value)  # one line
