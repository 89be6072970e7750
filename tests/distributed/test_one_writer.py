"""One live writer per run folder: workers die with their launcher, a second run into a live folder
is refused, and metrics.jsonl keeps one row per step through kills and resumes.

Every launch here goes through a real launcher (torchrun, or ``accelerate launch``) in a process
group of its own, and the kills are SIGKILLs of that whole group, as a user's ``kill -9 -PGID``,
the OOM killer or a dying node agent would do it. torch's agent starts each worker in a session of
its own, so the kill reaches the agent only; the workers must notice and die by themselves
(``moe_dist.parallel.launcher_guard``). ``MOE_DIST_FAULT_ACTION=hang`` holds a run at a named point
(a save, or between two steps) so that a kill or a second launch lands exactly there.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from moe_dist.checkpoint import layout
from moe_dist.checkpoint.cli import main as ckpt_main
from moe_dist.run.lock import LOCK_NAME, run_status

from .launcher import Launched, rows_in
from .trainrun import by_step, metrics, snapshot, train

pytestmark = pytest.mark.distributed

DEADLINE_S = 15.0  # the bound: no worker of a killed launcher alive after this
HOLDING = "fault point {}: holding here until killed"


def hang_at(point: str, step: int, rank: int = 0) -> dict[str, str]:
    return {"MOE_DIST_FAULT": f"{point}@{rank}", "MOE_DIST_FAULT_STEP": str(step), "MOE_DIST_FAULT_ACTION": "hang"}


def assert_one_row_per_step(out: Path, steps: int) -> dict[int, dict]:
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), [r["step"] for r in rows]
    return by_step(rows)


def kill_and_check(run: Launched) -> float:
    seconds, alive = run.kill_group(grace=DEADLINE_S)
    assert not alive, f"workers {alive} outlived their launcher by {DEADLINE_S:.0f}s:\n{run.output()[-3000:]}"
    return seconds


def test_launcher_group_kill_during_a_step(tmp_path):
    """accelerate launch (its agent runs in the accelerate process), training with no saves."""
    run = Launched(tmp_path / "run", "--max-steps", "100000", "--save-every", "0", kind="accelerate")
    try:
        run.wait_rows(3)
        seconds = kill_and_check(run)
        rows = rows_in(run.out)
        time.sleep(2)
        assert rows_in(run.out) == rows  # nobody trains on
        assert not (run.out / "checkpoints").exists() or not layout.complete_checkpoints(run.out / "checkpoints")
    finally:
        run.close()
    print(f"accelerate launch killed during a step: workers gone after {seconds:.2f}s")


def test_launcher_group_kill_during_a_save_then_relaunch(tmp_path):
    """torchrun; rank 0 held inside the step-2 save (shards written, DCP metadata not). The orphans
    must not finish that save; the relaunch right after finds the lock free (the .lock file is
    still there, naming the dead holder), starts fresh, and metrics.jsonl has each step once."""
    out = tmp_path / "run"
    args = ("--max-steps", "4", "--save-every", "2", "--resume", "auto")
    run = Launched(out, *args, env=hang_at("before_metadata", 2))
    try:
        run.wait_for("a held save", lambda: HOLDING.format("before_metadata") in run.output(), timeout=300)
        assert rows_in(out) == 2
        seconds = kill_and_check(run)
    finally:
        run.close()
    root = out / "checkpoints"
    assert layout.complete_checkpoints(root) == [] and len(layout.leftovers(root)) == 1  # the save stayed unfinished
    assert (out / LOCK_NAME).is_file()  # a stale file, but no stale lock

    log = train(out, 2, *args, timeout=300)[0].output  # the harness: straight away, no launcher
    assert "is in use by" not in log
    assert "--resume auto: no complete checkpoint" in log
    assert_one_row_per_step(out, 4)  # the killed run's rows 1-2 were not kept twice
    assert not (out / LOCK_NAME).exists()  # a run that ends removes its lock file
    print(f"torchrun killed during a save: workers gone after {seconds:.2f}s")


def test_second_launch_into_a_live_folder_is_refused(tmp_path, capsys):
    """A live torchrun run is held between steps 2 and 3 (step 1 saved). A second launch into its
    folder, on another world size, with --resume auto, is refused on every rank with the holder's
    PID, host and start time, and changes nothing; moe-ckpt info shows the run live, then not."""
    out = tmp_path / "run"
    live = Launched(out, "--max-steps", "6", "--save-every", "1", env=hang_at("after_step", 2))
    try:
        live.wait_for("a held run", lambda: HOLDING.format("after_step") in live.output(), timeout=300)
        holder = (out / LOCK_NAME).read_text()
        pid = live.rank_pid(0)
        assert f'"pid": {pid},' in holder, holder
        before = snapshot(out)

        res = train(out, 3, "--max-steps", "6", "--save-every", "1", "--resume", "auto", timeout=300, check=False,
                    stop_on_failure=False)
        assert [r.returncode for r in res] == [2, 2, 2], [(r.rank, r.returncode, r.output[-1500:]) for r in res]
        for r in res:
            assert "Traceback" not in r.output, r.output[-3000:]
        errors = [line for line in res[0].output.splitlines() if line.startswith("error")]
        assert len(errors) == 1, res[0].output[-3000:]
        pattern = (rf"error: {re.escape(str(out))} is in use by PID {pid} on host "
                   rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{{4}}; "
                   r"stop that run or choose another --output-dir$")
        assert re.match(pattern, errors[0]), errors[0]
        assert "DeepSpeed ZeRO" not in res[0].output  # refused before the engine (or the data) was built
        assert snapshot(out) == before

        capsys.readouterr()
        assert ckpt_main(["info", str(out)]) == 0
        shown = capsys.readouterr().out
        assert re.search(rf"live run\W+yes: PID {pid} on host ", shown), shown
        kill_and_check(live)
    finally:
        live.close()
    deadline = time.monotonic() + 5
    while run_status(out) is not None and time.monotonic() < deadline:  # the kernel drops it as the holder exits
        time.sleep(0.05)
    assert ckpt_main(["info", str(out)]) == 0  # the lock went with its killed holder
    shown = capsys.readouterr().out
    assert re.search(r"live run\W+no\b", shown), shown


def test_sigterm_to_the_launcher_still_saves_and_exits(tmp_path):
    """SIGTERM to torchrun's agent only: it forwards it, the workers save the step they are at and
    exit cleanly before the agent does, so the parent-death guard never fires."""
    out = tmp_path / "run"
    run = Launched(out, "--max-steps", "100000", "--save-every", "0")
    try:
        run.wait_rows(2)
        os.kill(run.proc.pid, signal.SIGTERM)
        run.wait(timeout=180)
        log = run.output()
        assert not run.alive_workers()
    finally:
        run.close()
    stop = re.search(r"preempted: stopped by SIGTERM at step (\d+), saved \S+; continue with --resume auto", log)
    assert stop, log[-4000:]
    step = int(stop.group(1))
    assert "launcher PID" not in log  # the watchdog's line: nobody was orphaned
    root = out / "checkpoints"
    assert [s for s, _ in layout.complete_checkpoints(root)] == [step]
    assert (root / layout.LATEST).resolve() == (root / layout.step_dir_name(step)).resolve()
    assert_one_row_per_step(out, step)


def _random_kills(tmp_path, kills: int, seed: int) -> None:
    """``kills`` SIGKILLs of the launcher's group, each at a random moment after the attempt has
    trained a step (saves every step, so kills land in steps, saves and publishes alike), then a
    last ``--resume auto`` to the end: one row per step, losses bitwise equal to a run never killed."""
    rng = random.Random(seed)
    steps = 8 * kills + 4  # room for up to ~8 steps of progress per attempt; the last run does the rest
    args = ("--max-steps", str(steps), "--save-every", "1", "--resume", "auto")
    ref_out = tmp_path / "reference"
    ref = Launched(ref_out, *args)
    try:
        assert ref.wait(timeout=600) == 0, ref.output()[-4000:]
    finally:
        ref.close()
    reference = assert_one_row_per_step(ref_out, steps)

    out, times, in_save = tmp_path / "run", [], 0
    for k in range(kills):
        run = Launched(out, *args)
        try:
            run.wait_for("the start banner", lambda: "preset tiny:" in run.output(), timeout=300)
            start = rows_in(out)
            run.wait_rows(start + 1)
            time.sleep(rng.uniform(0.0, 1.0))
            times.append(kill_and_check(run))
        finally:
            run.close()
        assert "is in use by" not in run.output()
        in_save += "unfinished save" in run.output()  # this attempt met the previous kill's half-done save
    last = Launched(out, *args)
    try:
        assert last.wait(timeout=600) == 0, last.output()[-4000:]
        log = last.output()
    finally:
        last.close()
    assert "is in use by" not in log
    in_save += "unfinished save" in log
    rows = assert_one_row_per_step(out, steps)
    for s in range(1, steps + 1):
        assert rows[s]["loss"] == reference[s]["loss"], f"step {s}: {rows[s]['loss']!r} != {reference[s]['loss']!r}"
        assert rows[s]["tokens"] == reference[s]["tokens"]
    print(f"{kills} kills (seed {seed}; {in_save} of them left a half-written save): workers gone after max "
          f"{max(times):.2f}s, mean {sum(times) / len(times):.2f}s")


def test_random_kills_then_resume_auto(tmp_path):
    _random_kills(tmp_path, kills=2, seed=16)


@pytest.mark.slow
def test_ten_random_kills_then_resume_auto(tmp_path):
    _random_kills(tmp_path, kills=10, seed=1016)
