"""``moe-ckpt import-seed``: a seed-format checkpoint (``tests/seed_fixture.py``, built from the facts)
becomes a run folder whose weights, Muon momentum (idle experts included), AdamW moments and step,
next LR and counters are the seed's; its eval logits equal the seed reference forward; loading
refuses any global but the seed's config classes, naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from moe_dist.checkpoint.cli import main as ckpt_main
from moe_dist.checkpoint.errors import CheckpointError
from moe_dist.config import RunConfig, load_config_file, apply_overrides, get_preset
from moe_dist.run.optim import LRSchedule
from moe_dist.seed.importer import import_seed
from moe_dist.seed.keys import our_name
from moe_dist.seed.load import load_seed

from ..seed_fixture import make_seed_checkpoint, seed_lambda
from ..seed_reference import seed_forward


class NotAConfig:
    """A class the safe loader has never heard of."""


@pytest.fixture
def imported(tmp_path):
    src = tmp_path / "checkpoint_step_60.pt"
    written = make_seed_checkpoint(src, opt_steps=30)
    final = import_seed(str(src), str(tmp_path / "run"), log=lambda _line: None)
    return written, final, tmp_path / "run"


def _saved(final: Path, tmp: Path) -> dict:
    out = tmp / "flat.pt"
    dcp_to_torch_save(str(final), str(out))
    return torch.load(out, weights_only=True)


def test_every_tensor_lands_under_its_parameter(imported, tmp_path):
    written, final, _ = imported
    saved = _saved(final, tmp_path)
    model, optim = saved["model"], saved["optim"]["state"]
    for seed_name, t in written["model"].items():
        assert torch.equal(model[our_name(seed_name)], t), seed_name
    for pos, seed_name in enumerate(written["muon_names"]):
        got = optim[our_name(seed_name)]["momentum_buffer"]
        if seed_name in written["idle"]:  # no state in the seed (never got a token): zeros, as Muon starts
            assert torch.equal(got, torch.zeros_like(got)), seed_name
        else:
            assert torch.equal(got, written["muon_state"][pos]["momentum_buffer"]), seed_name
    assert len(written["idle"]) == 2
    for pos, seed_name in enumerate(written["adam_names"]):
        st = optim[our_name(seed_name)]
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], written["adam_state"][pos][k]), (seed_name, k)
        assert float(st["step"]) == 30.0
    assert "lm_head.weight" not in optim and torch.equal(model["lm_head.weight"], model["embed.weight"])


def test_next_lr_counters_and_metrics_are_the_seeds(imported):
    written, final, run = imported
    cfg = apply_overrides(get_preset("4090"), load_config_file(str(run / "config.yaml")))
    lrs = LRSchedule.from_config(cfg.train).lrs(30)
    muon_lr, adam_lr = written["lrs"]
    assert lrs["muon"] == pytest.approx(muon_lr, rel=1e-12) and lrs["adamw"] == pytest.approx(adam_lr, rel=1e-12)
    assert seed_lambda(30, 400) < 1  # still in the warmup: the +1 of our default warmup would show
    state = json.loads((final / "train_state.json").read_text())
    assert state["step"] == 30 and state["imported_from"]["micro_batches"] == 60
    assert state["tokens"] == 60 * 2 * 32
    assert state["sampler"]["fresh"] and state["sampler"]["global_batch_size"] == 4
    assert state["metrics"]["last"]["val_loss"] == 4.25
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30
    assert cfg.train.weight_decay_on == "adamw" and cfg.train.warmup_steps == 20 and cfg.train.max_steps == 400


def test_eval_logits_equal_the_seed_reference(imported):
    import moe_dist

    written, final, run = imported
    model, cfg, step = moe_dist.load_model_for_inference(str(run))
    assert step == 30 and cfg.model.fused_qkv and cfg.model.dropout == 0.1
    tokens = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _ = model(tokens, return_aux_loss=False)
    want = seed_forward(written["model"], 4, 2, tokens)
    assert (got - want).abs().max() <= 1e-5


def test_cli_and_front_door(tmp_path, capsys):
    from moe_dist.commands import main as moe_main

    src = tmp_path / "s.pt"
    make_seed_checkpoint(src, kind="b200")
    assert ckpt_main(["import-seed", str(src), "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert sum("data cursor starts fresh" in line for line in out.splitlines()) == 1
    assert (tmp_path / "a" / "checkpoints" / "checkpoint_latest").is_symlink()
    assert ckpt_main(["verify", str(tmp_path / "a")]) == 0
    rc = ckpt_main(["import-seed", str(src), "--output-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "not empty" in err and len(err.splitlines()) == 1
    assert moe_main(["ckpt", "import-seed", str(src), "--output-dir", str(tmp_path / "b")]) == 0
    assert RunConfig.from_dict({}) is not None


def test_refuses_any_other_global_naming_it(tmp_path):
    src = tmp_path / "bad.pt"
    make_seed_checkpoint(src, extra=NotAConfig())
    with pytest.raises(CheckpointError, match=r"NotAConfig.*nothing was executed") as e:
        load_seed(src)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(CheckpointError, match="not empty|no such file"):
        import_seed(str(tmp_path / "missing.pt"), str(tmp_path / "run"), log=lambda _l: None)


def test_resume_from_a_seed_file_says_how(tmp_path):
    from moe_dist.checkpoint.layout import resolve_resume

    src = tmp_path / "checkpoint_latest.pt"
    make_seed_checkpoint(src)
    with pytest.raises(CheckpointError, match="moe-ckpt import-seed .*--resume auto") as e:
        resolve_resume(str(src), str(tmp_path / "run"))
    assert str(e.value).startswith("--resume ") and "\n" not in str(e.value)


def test_a_field_the_seed_config_lacks_is_asked_for(tmp_path):
    src = tmp_path / "s.pt"
    make_seed_checkpoint(src)
    sc = load_seed(src)
    del sc.config["n_heads"]
    from moe_dist.seed.importer import run_config

    with pytest.raises(CheckpointError, match=r"none of n_heads, num_heads; pass it with --set model.n_heads=VALUE"):
        run_config(sc, str(tmp_path / "run"), {})
    assert run_config(sc, str(tmp_path / "run"), {"model.n_heads": 4}).model.n_heads == 4
