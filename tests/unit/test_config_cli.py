"""Config presets, overrides, validation messages and the --help text."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moe_dist.run.cli import build_parser, config_help_text, parse
from moe_dist.config import ConfigError, RunConfig, apply_overrides, get_preset, load_config_file
from moe_dist.parallel.deepspeed.config import build_ds_config, read_launch_json
from moe_dist.parallel.dims import batch_layout


def test_presets_mirror_the_seed():
    b = get_preset("b200").model
    assert (b.d_model, b.n_heads, b.n_layers, b.d_ff, b.num_experts, b.top_k) == (2816, 22, 30, 7680, 8, 2)
    g = get_preset("4090")
    assert (g.model.d_model, g.model.n_heads, g.model.n_layers, g.model.d_ff, g.model.num_experts) == (
        1024, 8, 12, 2752, 8)
    assert (g.train.seq_len, g.train.micro_batch_size, g.train.global_batch_size) == (1024, 2, 32)


def test_set_overrides_coerce_types_and_validate():
    cfg = apply_overrides(get_preset("tiny"), {"model.d_model": "256", "shared_expert": "true",
                                               "train.adam_betas": "0.8,0.9", "capacity_factor": "1.25"})
    assert cfg.model.d_model == 256 and cfg.model.shared_expert is True
    assert cfg.train.adam_betas == (0.8, 0.9) and cfg.parallel.capacity_factor == 1.25
    with pytest.raises(ConfigError, match=r"model.d_model: expected a multiple of n_heads \(4\), found 130"):
        apply_overrides(get_preset("tiny"), {"model.d_model": "130"})
    with pytest.raises(ConfigError, match="cannot parse 'abc' as int"):
        apply_overrides(get_preset("tiny"), {"model.d_model": "abc"})


def test_config_file_and_round_trip(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("model:\n  n_layers: 3\ntrain:\n  muon_lr: 0.05\n")
    cfg = apply_overrides(get_preset("tiny"), load_config_file(str(f)))
    assert cfg.model.n_layers == 3 and cfg.train.muon_lr == 0.05
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: cannot parse"):
        load_config_file(str(bad))


def test_cli_flags_win_over_set():
    _, cfg = parse(["--set", "train.max_steps=5", "--max-steps", "7", "--zero-stage", "3", "--offload-optimizer"])
    assert cfg.train.max_steps == 7 and cfg.parallel.zero_stage == 3 and cfg.parallel.offload_optimizer is True


def test_help_mentions_every_flag_and_field():
    text = build_parser().format_help()
    for flag in ("--preset", "--set", "--max-steps", "--output-dir", "--zero-stage", "--ep-size", "--resume",
                 "--save-every", "--keep-last", "--async-save", "--data-files", "--print-params", "--init-timeout",
                 "--train-timeout"):
        assert flag in text
    assert "Expert-parallel degree" in text  # field docstrings become --help
    assert "75 stopped by SIGTERM or Ctrl-C after saving a checkpoint" in " ".join(text.split())
    from moe_dist import exit_codes

    codes = {exit_codes.USAGE, exit_codes.DIVERGED, exit_codes.INFRA, exit_codes.PREEMPTED, exit_codes.HUNG}
    assert len(codes) == 5 and 1 not in codes and 0 not in codes  # distinct, none taken by Python's own 0 / 1
    for code, meaning in exit_codes.MEANING.items():  # each one documented in --help
        assert "".join(f"{code} {meaning}".split()) in "".join(text.split())  # argparse wraps at hyphens
    assert "model.router_noise_std" in config_help_text()


def test_print_params_cli():
    out = subprocess.run([sys.executable, "-m", "moe_dist.train", "--preset", "18b", "--print-params"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "preset 18b: total" in out.stdout


def test_global_batch_layout():
    cfg = get_preset("tiny")
    assert [batch_layout(cfg, w).grad_accum for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    with pytest.raises(ConfigError, match=r"global_batch_size \(12\) must be divisible .* world size \(5\)"):
        batch_layout(cfg, 5)


def test_ds_config_resolves_everything():
    cfg = apply_overrides(get_preset("tiny"), {"parallel.zero_stage": 3})
    ds = build_ds_config(cfg, read_launch_json(None), world_size=2, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == 6
    assert ds["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match="offload_params needs ZeRO stage 3"):
        build_ds_config(apply_overrides(get_preset("tiny"), {"offload_params": True, "zero_stage": 2}),
                        read_launch_json(None), 1, False)


@pytest.mark.parametrize("world, stage, op", [(1, 1, "sum"), (1, 2, "sum"), (1, 3, None), (2, 2, None)])
def test_one_rank_reduces_by_sum(world, stage, op):
    """On one rank ZeRO-1/2 would divide every gradient by 1.0 (a pass over all of them); 'sum' is the
    same numbers. Never on more ranks, and never under ZeRO-3 (DeepSpeed refuses it there)."""
    cfg = apply_overrides(get_preset("tiny"), {"parallel.zero_stage": stage})
    ds = build_ds_config(cfg, read_launch_json(None), world_size=world, on_gpu=False)
    assert ds.get("gradient_allreduce_op") == op


def test_help_config_shows_the_chosen_preset(capsys):
    from moe_dist.train import run

    assert run(["--preset", "18b", "--help-config"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("values of preset 18b")
    assert "model.d_model = 4096" in text and "model.d_model = 128" not in text
    assert run(["--preset", "18b", "--set", "model.n_layers=3", "--help-config"]) == 0
    text = capsys.readouterr().out
    assert "with your overrides" in text and "model.n_layers = 3" in text


def test_config_file_errors_name_the_file_not_set(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("model:\n  nonsense: 3\n")
    with pytest.raises(ConfigError) as err:
        parse(["--config", str(f)])
    assert str(err.value) == f"config file {f}: model.nonsense: model has no field 'nonsense' (see `moe-train --help-config`)"
    with pytest.raises(ConfigError, match=r"^--set model.nonsense: model has no field"):
        parse(["--set", "model.nonsense=3"])


def test_common_flags():
    _, cfg = parse(["--lr", "0.05", "--global-batch-size", "24", "--log-every", "5", "--eval-every", "7"])
    assert (cfg.train.muon_lr, cfg.train.adamw_lr) == (0.05, get_preset("tiny").train.adamw_lr)
    assert (cfg.train.global_batch_size, cfg.train.log_every, cfg.train.eval_every) == (24, 5, 7)
    _, cfg = parse(["--lr", "0.001", "--set", "train.optimizer=adamw"])
    assert (cfg.train.adamw_lr, cfg.train.muon_lr) == (0.001, get_preset("tiny").train.muon_lr)
    assert "--lr" in build_parser().format_help() and "--global-batch-size" in build_parser().format_help()


def test_print_params_in_millions_for_small_models(capsys):
    from moe_dist.train import run

    assert run(["--preset", "tiny", "--print-params"]) == 0
    out = capsys.readouterr().out
    assert "0.00B" not in out and "M)" in out
    assert run(["--preset", "18b", "--print-params"]) == 0
    assert "B)" in capsys.readouterr().out


def test_ep_size_hint_lists_degrees_that_fit_the_world():
    from moe_dist.parallel.dims import validate_ep

    with pytest.raises(ConfigError, match=r"with 6 processes choose --ep-size from 1, 2$"):
        validate_ep(apply_overrides(get_preset("tiny"), {"ep_size": 3}), 6)  # 3 divides 6 but not 8 experts
    with pytest.raises(ConfigError, match=r"with 2 processes choose --ep-size from 1, 2, or launch a multiple of 4"):
        validate_ep(apply_overrides(get_preset("tiny"), {"ep_size": 4}), 2)


def test_defaults_raise_no_grad_clip_warning(monkeypatch):
    from moe_dist.parallel.deepspeed import config as deepspeed_config

    seen = []
    monkeypatch.setattr(deepspeed_config, "warn_once", seen.append)
    ds = build_ds_config(get_preset("tiny"), read_launch_json(None), 1, False)
    assert seen == [] and ds["gradient_clipping"] == 0.0  # Muon: off, silently
    ds = build_ds_config(apply_overrides(get_preset("tiny"), {"train.optimizer": "adamw"}), read_launch_json(None),
                         1, False)
    assert seen == [] and ds["gradient_clipping"] == 1.0  # AdamW: 1.0
    build_ds_config(apply_overrides(get_preset("tiny"), {"train.grad_clip": "1.0"}), read_launch_json(None), 1, False)
    assert len(seen) == 1 and "grad_clip=1.0 is not applied with the Muon optimizer" in seen[0]  # asked for: said
