"""config.yaml, loss_curve.png and the tracker plumbing (what Accelerate's trackers are handed)."""

from __future__ import annotations

import json

import pytest

from moe_dist.run import artifacts as run_artifacts, trackers
from moe_dist.run.cli import parse
from moe_dist.config import ConfigError, apply_overrides, get_preset


def test_config_yaml_runs_the_same_config_again(tmp_path):
    _, cfg = parse(["--preset", "tiny", "--set", "model.d_model=64", "--set", "model.n_heads=2", "--lr", "0.05",
                    "--output-dir", str(tmp_path)])
    path = run_artifacts.write_config(cfg, str(tmp_path))
    _, again = parse(["--config", path])
    assert again.to_dict() == {**cfg.to_dict(), "preset": again.preset}


def test_loss_curve_from_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    assert run_artifacts.plot_loss_curve(str(tmp_path)) is None  # no metrics: no picture
    rows = [{"step": s, "tokens": 384 * s, "loss": 5.0 - 0.1 * s} for s in range(1, 7)]
    rows[3]["val_loss"] = 4.7
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    path = run_artifacts.plot_loss_curve(str(tmp_path))
    assert path == str(tmp_path / "loss_curve.png")
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_to_flag_and_tracker_values():
    _, cfg = parse(["--report-to", "tensorboard,wandb"])
    assert cfg.train.report_to == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="train.report_to: expected 'tensorboard', 'wandb' or 'none', found 'mlflow'"):
        parse(["--report-to", "mlflow"])
    assert trackers.requested(get_preset("tiny")) == []
    assert trackers.accelerator_kwargs([], "runs/x") == {}
    assert trackers.accelerator_kwargs(["tensorboard"], "runs/x") == {"log_with": ["tensorboard"],
                                                                      "project_dir": "runs/x"}
    hp = trackers.hparams(get_preset("tiny"))
    assert hp["model.d_model"] == 128 and hp["train.adam_betas"] == "(0.9, 0.95)" and hp["train.grad_clip"] == "None"
    assert all(isinstance(v, (bool, int, float, str)) for v in hp.values())
    row = {"step": 3, "loss": 2.5, "tokens": 1152, "grad_norm": None, "expert_tokens": [1, 2], "lr": 1e-3}
    assert trackers.scalars(row) == {"loss": 2.5, "tokens": 1152.0, "lr": 1e-3}


def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    cfg = apply_overrides(get_preset("tiny"), {"train.report_to": "wandb"})
    with pytest.raises(ConfigError, match=r"wandb needs the wandb package, which is not installed; "
                                          r"pip install 'moe_dist\[wandb\]'"):
        trackers.requested(cfg)


def test_wandb_runs_offline_into_the_run_folder(tmp_path, monkeypatch):
    """What trackers.start hands Accelerate opens a real offline W&B run under <output-dir>/wandb."""
    wandb = pytest.importorskip("wandb")

    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    cfg = apply_overrides(get_preset("tiny"), {"checkpoint.output_dir": str(tmp_path / "run"),
                                               "train.report_to": "wandb"})
    (tmp_path / "run").mkdir()
    calls = []

    class Recorder:
        def init_trackers(self, project_name, config, init_kwargs):
            calls.append((project_name, config, init_kwargs))

    trackers.start(Recorder(), cfg, ["wandb"])
    (project, config, init_kwargs) = calls[0]
    assert init_kwargs["wandb"]["mode"] == "offline" and init_kwargs["wandb"]["dir"] == str(tmp_path / "run")
    # What Accelerate's WandBTracker.start / store_init_configuration / log / finish do (they need an
    # accelerate state this unit test does not make):
    run = wandb.init(project=project, **init_kwargs["wandb"])
    run.config.update(config, allow_val_change=True)
    run.log(trackers.scalars({"step": 1, "loss": 2.5, "expert_tokens": [1]}), step=1)
    run.finish()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
