"""``moe-ckpt info`` / ``moe-ckpt verify`` on small hand-made checkpoints (no processes, no training)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe_dist.checkpoint import layout
from moe_dist.checkpoint.cli import main
from moe_dist.checkpoint.manifest import write_manifest
from moe_dist.config import ModelConfig, RunConfig

from ..corrupt import flip_bits

MODEL = ModelConfig(vocab_size=64, d_model=8, n_heads=2, d_ff=4, num_experts=2, top_k=1, n_layers=1,
                    expert_type="silu_mlp")


def make_checkpoint(run, step, drop_expert=False, nan_in=None):
    """A checkpoint folder the way the manager lays it out: DCP expert shards, train_state, manifest."""
    root = layout.checkpoints_dir(str(run))
    folder = root / layout.step_dir_name(step)
    sd = {f"model.layers.0.ffn.experts.{e}.{m}.weight": torch.arange(32, dtype=torch.float32) + e
          for e in range(2) for m in ("w_up", "w_down")}
    sd["model.embed.weight"] = torch.zeros(64 * 8)
    if drop_expert:
        del sd["model.layers.0.ffn.experts.1.w_down.weight"]
    if nan_in:
        sd[nan_in][3] = float("nan")
    dcp.save(sd, checkpoint_id=str(folder), no_dist=True)
    cfg = RunConfig(model=MODEL).to_dict()
    topology = {"world_size": 4, "zero_stage": 2, "ep_size": 2, "optimizer": "muon"}
    state = {"step": step, "tokens": step * 384, "config": cfg, "topology": topology,
             "saved_at": "2026-01-02T03:04:05+0000", "torch": torch.__version__}
    (folder / layout.TRAIN_STATE).write_text(json.dumps(state))
    write_manifest(folder, {"step": step, "tokens": step * 384, "topology": topology})
    layout.point_latest(root, folder)
    return folder


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 5)
    make_checkpoint(run, 10)
    return run


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _shard(folder):
    return next(folder.glob("*.distcp"))


@pytest.mark.parametrize("which", ["run", "checkpoints", "latest", "step"])
def test_info_finds_the_checkpoint(run, capsys, which):
    path = {"run": run, "checkpoints": run / "checkpoints", "latest": run / "checkpoints" / layout.LATEST,
            "step": run / "checkpoints" / "checkpoint_step_10"}[which]
    code, out, err = cli(capsys, "info", str(path))
    assert code == 0 and err == ""
    for text in ("checkpoint_step_10", "step", "10", "tokens", "3,840", "world size", "4", "ZeRO stage", "EP degree",
                 "optimizer", "muon", "size on disk", "files", "2026-01-02T03:04:05+0000",
                 "d_model 8, 1 layers, 2 heads (2 kv), 2 experts top-1 (silu_mlp)", "complete", "yes"):
        assert text in out, text


def test_info_of_an_older_step_and_without_latest(run, capsys):
    (run / "checkpoints" / layout.LATEST).unlink()
    code, out, _ = cli(capsys, "info", str(run))  # no pointer: the newest complete one
    assert code == 0 and "checkpoint_step_10" in out
    code, out, _ = cli(capsys, "info", str(run / "checkpoints" / "checkpoint_step_5"))
    assert code == 0 and "1,920" in out


def test_verify_ok(run, capsys):
    code, out, err = cli(capsys, "verify", str(run))
    assert code == 0 and err == ""
    assert out.startswith(f"OK {run / 'checkpoints' / 'checkpoint_step_10'}: step 10, ")
    assert ("sizes and checksums (xxh3-128) match the manifest, every tensor finite; 2 experts x 1 layers each "
            "saved exactly once") in out
    code, out, _ = cli(capsys, "verify", str(run), "--no-checksums")
    assert code == 0 and "sizes match the manifest (checksums and finiteness scan skipped)" in out


def test_verify_refuses_a_nan_checkpoint(tmp_path, capsys):
    """A hand-made checkpoint whose manifest is right but one tensor holds a NaN: refused, one line, exit 1."""
    run = tmp_path / "nan"
    folder = make_checkpoint(run, 5, nan_in="model.layers.0.ffn.experts.1.w_up.weight")
    code, out, err = cli(capsys, "verify", str(run))
    assert code == 1 and out == ""
    assert err == (f"error: {folder}: tensor model.layers.0.ffn.experts.1.w_up.weight holds 1 non-finite value(s) "
                   "(NaN or inf) of 32; the run had diverged when it was saved: use an earlier checkpoint\n")


def test_verify_refuses_a_manifest_recording_nonfinite(run, capsys):
    folder = run / "checkpoints" / "checkpoint_step_10"
    manifest = json.loads((folder / layout.MANIFEST).read_text())
    write_manifest(folder, {k: manifest[k] for k in ("step", "tokens", "topology")} | {"finite": False})
    code, _, err = cli(capsys, "verify", str(run), "--no-checksums")
    assert code == 1 and err == (f"error: {folder}: its manifest records non-finite values (NaN or inf); resume "
                                 "from another checkpoint\n")


def test_verify_bit_flip_needs_checksums(run, capsys):
    shard = _shard(run / "checkpoints" / "checkpoint_step_10")
    flip_bits(shard)
    code, out, err = cli(capsys, "verify", str(run))
    assert code == 1 and out == ""
    assert err.startswith(f"error: {shard}: checksum (xxh3-128) ") and "differs from the manifest's" in err
    assert err.count("\n") == 1  # one line
    assert cli(capsys, "verify", str(run), "--no-checksums")[0] == 0  # sizes alone cannot see it


def test_verify_truncated_shard(run, capsys):
    shard = _shard(run / "checkpoints" / "checkpoint_step_10")
    size = shard.stat().st_size
    os.truncate(shard, size - 7)
    code, _, err = cli(capsys, "verify", str(run), "--no-checksums")
    assert code == 1
    assert err == (f"error: {shard}: size {size - 7} bytes, manifest says {size} (truncated or modified copy); "
                   "restore it or resume from another checkpoint\n")


def test_verify_partial_checkpoint(run, capsys):
    folder = run / "checkpoints" / "checkpoint_step_10"
    (folder / layout.MANIFEST).unlink()
    code, _, err = cli(capsys, "verify", str(folder))
    assert code == 1
    assert err == (f"error: {folder}: incomplete checkpoint (missing manifest.json); it was interrupted while "
                   "saving; use an earlier one\n")
    code, out, _ = cli(capsys, "info", str(folder))  # info still shows what is there
    assert code == 0 and "no (missing manifest.json)" in out


def test_verify_audit_catches_a_missing_expert(tmp_path, capsys):
    folder = make_checkpoint(tmp_path / "run", 3, drop_expert=True)  # manifest matches: only the audit sees it
    code, _, err = cli(capsys, "verify", str(folder))
    assert code == 1
    assert err == f"error: {folder}: experts missing from the checkpoint: layer 0 expert 1\n"


def test_verify_steps_disagree(run, capsys):
    folder = run / "checkpoints" / "checkpoint_step_10"
    shutil.copy(run / "checkpoints" / "checkpoint_step_5" / layout.MANIFEST, folder / layout.MANIFEST)
    code, _, err = cli(capsys, "verify", str(folder), "--no-checksums")
    assert code == 1 and "error: " in err and err.count("\n") == 1


@pytest.mark.parametrize("make, message", [
    (lambda t: t / "nope", "{p}: no such file or folder"),
    (lambda t: (t / "plain").mkdir() or t / "plain", "{p}: not a checkpoint (no .metadata, manifest.json or "
                                                     "checkpoints/ inside)"),
    (lambda t: (t / "f.txt").write_text("x") and t / "f.txt", "{p}: a file, not a folder; give a "
                                                               "checkpoint_step_<N> folder, checkpoint_latest or a "
                                                               "run folder"),
    (lambda t: (t / "r" / "checkpoints").mkdir(parents=True) or t / "r", "{p}: no complete checkpoint under {p}/"
                                                                          "checkpoints"),
], ids=["missing", "plain_folder", "file", "empty_run"])
def test_not_a_checkpoint_exits_2(tmp_path, capsys, make, message):
    path = make(tmp_path)
    for cmd in ("info", "verify"):
        code, out, err = cli(capsys, cmd, str(path))
        assert code == 2 and out == ""
        assert err == "error: " + message.format(p=path) + "\n"


def test_dangling_latest(run, capsys):
    shutil.rmtree(run / "checkpoints" / "checkpoint_step_10")
    code, out, _ = cli(capsys, "info", str(run))  # the run: its newest complete one, as --resume auto
    assert code == 0 and "checkpoint_step_5" in out
    code, _, err = cli(capsys, "info", str(run / "checkpoints" / layout.LATEST))
    assert code == 2 and "a link to checkpoint_step_10, which does not exist" in err


def test_info_agrees_with_resume_auto_when_latest_lags(run, capsys):
    """A save killed between publishing step 10 and moving the pointer leaves latest on step 5."""
    root = run / "checkpoints"
    layout.point_latest(root, root / "checkpoint_step_5")
    code, out, _ = cli(capsys, "info", str(run))
    assert code == 0 and "checkpoint_step_10" in out
    assert layout.resolve_resume("auto", str(run)) == root / "checkpoint_step_10"


def test_info_and_resume_auto_agree_on_a_truncated_shard(run, capsys):
    """The newest checkpoint has a shard cut short: info calls it incomplete, and for the run names the
    one --resume auto takes (the same rule: sizes against the manifest)."""
    folder = run / "checkpoints" / "checkpoint_step_10"
    shard = _shard(folder)
    os.truncate(shard, shard.stat().st_size - 3)
    code, out, _ = cli(capsys, "info", str(folder))
    assert code == 0 and "no (" in out and "truncated or modified copy" in " ".join(out.split())
    code, out, err = cli(capsys, "info", str(run))
    assert code == 0 and "checkpoint_step_5" in out and err.startswith("skipping a damaged checkpoint: ")
    # --resume auto skipping a damaged newest checkpoint: tests/distributed/test_resume.py, test_crash_safety.py


def test_help_and_console_script():
    proc = subprocess.run([sys.executable, "-m", "moe_dist.checkpoint.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for text in ("info", "verify", "checkpoint_latest", "Exit codes: 0 ok, 1 checkpoint incomplete/corrupt, 2 PATH"):
        assert text in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "moe_dist.checkpoint.cli", "verify", "--help"], capture_output=True,
                          text=True)
    assert "--no-checksums" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "moe_dist.checkpoint.cli"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: moe-ckpt" in proc.stderr
    script = shutil.which("moe-ckpt") or os.path.join(os.path.dirname(sys.executable), "moe-ckpt")
    if os.path.exists(script):
        proc = subprocess.run([script, "verify", "/no/such/path"], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr == "error: /no/such/path: no such file or folder\n"


class _Evil:
    """Unpickling this would create ``marker``: the attack a crafted ``.metadata`` could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_verify_and_resume_never_unpickle_code_from_metadata(run, tmp_path, capsys):
    """DCP's ``.metadata`` is a pickle; a checkpoint from someone else may carry a crafted one with a
    matching manifest. ``moe-ckpt verify`` and the resume path read it through the allow-list."""
    import pickle

    from moe_dist.checkpoint.errors import CheckpointError
    from moe_dist.checkpoint.dcp_state import read_saved_keys

    folder = layout.checkpoints_dir(str(run)) / layout.step_dir_name(10)
    marker = tmp_path / "pwned"
    (folder / layout.DCP_METADATA).write_bytes(pickle.dumps(_Evil(marker)))
    write_manifest(folder, {"step": 10, "tokens": 3840, "topology": {}})
    code, _, err = cli(capsys, "verify", str(folder))
    assert code == 1 and "refusing to unpickle io.open" in err, err
    with pytest.raises(CheckpointError, match="refusing to unpickle io.open"):
        read_saved_keys(str(folder))  # what the trainer's resume reads first
    assert not marker.exists()


def test_info_and_verify_count_the_same_files(tmp_path):
    from moe_dist.checkpoint.cli import info_report, verify_checkpoint

    from .test_consolidate import TINY, make_checkpoint

    _, folder = make_checkpoint(tmp_path, TINY)
    info = info_report(folder)
    line = verify_checkpoint(folder, checksums=False)
    assert f", {info['files']} files, " in line and info["files"] == len([p for p in folder.iterdir() if p.is_file()])
