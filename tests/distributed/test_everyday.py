"""Everyday use (issue 14): a plain ``python moe_dist/train.py`` run, a stop by SIGTERM, the files a run
leaves behind, and a validation loss that does not depend on the world size."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from moe_dist.checkpoint import layout

from .harness import REPO_ROOT
from .trainrun import FAST, TRAIN, metrics, train

pytestmark = pytest.mark.distributed

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _tensorboard_losses(folder) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[int, float] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            steps.update({e.step: e.value for e in acc.Scalars("loss")})
    return steps


def test_plain_python_run_sigterm_exit_75_and_the_run_folder(tmp_path):
    """No launcher, no RANK/WORLD_SIZE: one process trains. SIGTERM saves, prints one line, exits 75.
    The folder then holds config.yaml, loss_curve.png and TensorBoard events; a fresh start there is
    refused; --resume auto continues with exactly one metrics row per step."""
    tb = importlib.util.find_spec("tensorboard") is not None
    out, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = [sys.executable, TRAIN, *FAST, "--eval-every", "2", "--output-dir", str(out)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + ["--max-steps", "100000"] + (["--report-to", "tensorboard"] if tb else []),
                                cwd=REPO_ROOT, env=_plain_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"^step\s+3 ", log.read_text(), re.M):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 75, text[-3000:]
    assert "Traceback" not in text and "[moe_dist] WARNING" not in text, text[-3000:]  # no warning from defaults
    lines = [line for line in text.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 1, text[-3000:]
    step = int(re.search(r"stopped by SIGTERM at step (\d+), saved ", lines[0]).group(1))
    assert lines[0].endswith("continue with --resume auto (exit code 75)")
    assert step >= 3 and layout.is_complete(out / "checkpoints" / layout.step_dir_name(step))
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))
    assert any("val_loss" in r for r in metrics(out))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["model"]["d_model"] == 64 and saved_cfg["train"]["eval_every"] == 2
    if tb:
        assert sorted(_tensorboard_losses(out / "tensorboard")) == list(range(1, step + 1))

    again = subprocess.run(cmd + ["--max-steps", str(step + 2)], cwd=REPO_ROOT, env=_plain_env(),
                           capture_output=True, text=True, timeout=180)
    assert again.returncode == 2, again.stderr[-3000:]
    assert f"error: checkpoint.output_dir {out}: already holds a run (checkpoints/" in again.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))  # untouched

    resumed = subprocess.run(cmd + ["--max-steps", str(step + 2), "--resume", "auto"], cwd=REPO_ROOT,
                             env=_plain_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 3))  # one row per step, one run

    # Back to an older step by path: the later checkpoint is set aside, so the newest one in the folder
    # is this run's, and moe-ckpt info and --resume auto name the same one.
    older = out / "checkpoints" / layout.step_dir_name(step)
    back = subprocess.run(cmd + ["--max-steps", str(step + 1), "--resume", str(older)], cwd=REPO_ROOT,
                          env=_plain_env(), capture_output=True, text=True, timeout=300)
    assert back.returncode == 0, back.stdout[-2000:] + back.stderr[-2000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 2))
    newest = out / "checkpoints" / layout.step_dir_name(step + 1)
    assert layout.find_checkpoint(str(out)) == newest.resolve() == layout.resolve_resume("auto", str(out)).resolve()
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "checkpoints" / layout.step_dir_name(step + 2)).is_dir()  # moved, not deleted


def test_val_loss_is_the_same_on_2_and_3_ranks(tmp_path):
    """One fixed global validation sample: world 2 and 3 evaluate the same blocks."""
    vals = {}
    for world in (2, 3):
        out = tmp_path / f"w{world}"
        train(out, world, "--max-steps", "1", "--eval-every", "1", "--set", "train.eval_batches=7")
        vals[world] = metrics(out)[0]["val_loss"]
    assert vals[2] == pytest.approx(vals[3], rel=1e-5, abs=0), vals


@pytest.mark.parametrize("stage", ["2", "3"], ids=["zero2", "zero3"])
def test_init_from_weights_on_another_layout(tmp_path, stage):
    """A .pt of other weights starts a world-2, EP-2 run: with a ~0 learning rate its checkpoint after
    one step holds those weights; the step counter, schedule and data cursor start at 0. ZeRO-3: each
    rank reads the weights parameter by parameter into the partitions it builds."""
    import torch

    from moe_dist.run.cli import parse
    from moe_dist.export.inference import load_model_for_inference
    from moe_dist import model as lm

    _, cfg = parse([*FAST, "--output-dir", str(tmp_path / "unused")])
    torch.manual_seed(99)
    src = lm.build(cfg.model)
    pt = tmp_path / "weights.pt"
    torch.save({"model_state_dict": src.state_dict(), "config": cfg.to_dict(), "step": 500}, pt)
    out = tmp_path / "ft"
    train(out, 2, "--ep-size", "2", "--zero-stage", stage, "--init-from", str(pt), "--max-steps", "1",
          "--save-every", "1",
          "--set", "train.muon_lr=1e-12", "--set", "train.adamw_lr=1e-12")
    assert [r["step"] for r in metrics(out)] == [1]
    model, _, step = load_model_for_inference(out / "checkpoints" / "checkpoint_latest")
    assert step == 1
    torch.manual_seed(cfg.train.seed)
    fresh = lm.build(cfg.model)  # what the run would hold without --init-from
    for name, w in model.state_dict().items():
        assert (w - src.state_dict()[name]).abs().max() < 1e-6, name
    assert any(not torch.equal(w, fresh.state_dict()[k]) for k, w in src.state_dict().items())
