"""--engine fsdp2 in everyday use: its options, and the checkpoint guarantees DeepSpeed runs have.

* Activation checkpointing, CPU offload and the full (not meta) build change no number (fp32, CPU);
  bf16 compute with fp32 shards and reduction stays within BF16_REL of fp32 over 3 steps
  (measured: 1.7e-4).
* --async-save writes the same checkpoints as a synchronous save and resumes bitwise (a validation
  pass right before each save).
* A save killed at any point of the DeepSpeed crash matrix leaves only complete checkpoints; --resume auto
  continues bitwise (one point in the default set, the others slow).
* Bad input is refused with one error line: a damaged shard, another architecture, and the flags
  that do not apply to FSDP2.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from moe_dist.checkpoint import layout
from moe_dist.checkpoint.manifest import verify_manifest

from .test_bad_inputs import _flip_bit, error_line
from .test_crash_safety import FAULT_STEP, FAULTS, STEPS, _assert_latest_is_complete
from .trainrun import by_step, losses, metrics, train

pytestmark = pytest.mark.distributed

FSDP2 = ("--engine", "fsdp2")
BF16_REL = 2e-3


def test_options_change_no_number(tmp_path):
    base = ("--max-steps", "3", "--set", "train.optimizer=adamw", "--ep-size", "2", *FSDP2)
    runs = {}
    for name, extra in (("plain", ()), ("ac", ("--activation-checkpointing",)), ("offload", ("--offload-optimizer",)),
                        ("full_build", ("--set", "parallel.sharded_build=false")),
                        ("bf16", ("--set", "parallel.precision=bf16"))):
        res = train(tmp_path / name, 2, *base, *extra)
        runs[name] = losses(tmp_path / name)
        if name == "bf16":
            assert "FSDP2 dp 1 x ep 2, bf16" in res[0].output
    assert runs["ac"] == runs["plain"]
    assert runs["offload"] == runs["plain"]
    assert runs["full_build"] == runs["plain"]  # shards made from the meta build (make_shards) = a full fp32 build
    assert runs["bf16"] != runs["plain"]  # bf16 really computed
    for a, b in zip(runs["bf16"], runs["plain"]):
        assert abs(a - b) <= BF16_REL * b


def test_async_save_and_resume(tmp_path):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    # validation right before each save: the root then holds gathered weights (the fragments must not see them)
    args = ("--max-steps", "4", "--save-every", "2", "--eval-every", "2", *FSDP2, "--ep-size", "2")
    train(sync, 2, *args)
    train(asyn, 2, *args, "--async-save")
    assert losses(sync) == losses(asyn)
    ck = asyn / "checkpoints"
    for step in (2, 4):
        verify_manifest(ck / f"checkpoint_step_{step}")
        a = json.loads((ck / f"checkpoint_step_{step}" / "train_state.json").read_text())
        assert a["topology"]["engine"] == "fsdp2" and a["topology"]["zero_stage"] is None
    log = [json.loads(line) for line in (asyn / "checkpoint_log.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in log] == ["async", "async"]
    res = tmp_path / "resumed"
    (res / "checkpoints").mkdir(parents=True)
    shutil.copytree(ck / "checkpoint_step_2", res / "checkpoints" / "checkpoint_step_2")
    train(res, 2, *args, "--resume", "auto")
    a, b = by_step(metrics(sync)), by_step(metrics(res))
    assert [b[s]["loss"] for s in (3, 4)] == [a[s]["loss"] for s in (3, 4)]


KILL_ARGS = ("--max-steps", str(STEPS), "--save-every", "2", *FSDP2)


@pytest.fixture(scope="module")
def fsdp2_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_crash") / "ref"
    train(out, 2, *KILL_ARGS)
    return losses(out)


# Every kill point of the DeepSpeed crash matrix (test_crash_safety.FAULTS); one in the default set.
@pytest.mark.parametrize("point, rank, resume_step", [
    pytest.param(*f, marks=() if f[0] == "before_metadata" else pytest.mark.slow) for f in FAULTS],
    ids=[f[0] for f in FAULTS])
def test_kill_during_save_then_resume_auto(fsdp2_reference, tmp_path, point, rank, resume_step):
    out = tmp_path / "run"
    res = train(out, 2, *KILL_ARGS, env={"MOE_DIST_FAULT": f"{point}@{rank}", "MOE_DIST_FAULT_STEP": str(FAULT_STEP)},
                timeout=240, check=False)
    assert res[rank].returncode == -signal.SIGKILL, res[rank].output[-2000:]
    assert res[1 - rank].returncode != 0  # hung in a collective (killed by the harness) or failed
    root = out / "checkpoints"
    assert [s for s, _ in layout.complete_checkpoints(root)] == ([2, 4] if resume_step == 4 else [2])
    _assert_latest_is_complete(root, 4 if point == "after_latest" else 2)
    res = train(out, 2, *KILL_ARGS, "--resume", "auto", timeout=240)
    assert f"resumed from {root / layout.step_dir_name(resume_step)} at step {resume_step}" in res[0].output
    assert "FSDP2, EP 1" in res[0].output
    assert [s for s, _ in layout.complete_checkpoints(root)] == list(range(2, STEPS + 1, 2))
    assert losses(out) == fsdp2_reference


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_fsdp2") / "good"
    train(out, 1, "--max-steps", "2", "--save-every", "2", *FSDP2)
    return out


def _refused(out, *args, env=None):
    res = train(out, 1, *args, timeout=180, check=False, env=env)
    assert res[0].returncode == 2, f"exit {res[0].returncode}\n{res[0].output[-3000:]}"
    return error_line(res[0].output)


@pytest.mark.parametrize("case", ["bit_flip", "architecture"])
def test_bad_resume_is_refused(good_run, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(good_run, run, symlinks=True)
    extra: tuple[str, ...] = ()
    if case == "bit_flip":
        _flip_bit(run)
    else:
        extra = ("--set", "model.num_experts=4")
    line = _refused(run, "--max-steps", "4", "--resume", "auto", *FSDP2, *extra)
    want = "differs from the manifest's" if case == "bit_flip" else "model.num_experts: saved 8, requested 4"
    assert want in line, line


@pytest.mark.parametrize("args, env, want", [
    (("--zero-stage", "2"), None, "parallel.zero_stage: expected None with --engine fsdp2"),
    (("--deepspeed-config", "launch_configs/cpu_zero2.json"), None, "does not apply to --engine fsdp2"),
    ((), {"ACCELERATE_USE_FSDP": "true"}, "found distributed_type FSDP (ACCELERATE_USE_FSDP=true)"),
], ids=["zero_stage", "deepspeed_json", "accelerate_fsdp"])
def test_flags_that_do_not_apply_are_refused(tmp_path, args, env, want):
    line = _refused(tmp_path / "run", "--max-steps", "2", *FSDP2, *args, env=env)
    assert want in line, line
