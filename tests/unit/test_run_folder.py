"""One run folder, one run: what counts as a run, the refusal, and --overwrite moving the old run aside."""

from __future__ import annotations

import pytest

from moe_dist.config import ConfigError
from moe_dist.run.folder import check_fresh_start, run_traces, set_aside_later_checkpoints


def _old_run(folder):
    (folder / "checkpoints" / "checkpoint_step_10").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (folder / "config.yaml").write_text("model: {}\n")


def test_empty_folder_lock_and_probe_are_not_a_run(tmp_path):
    assert run_traces(str(tmp_path / "missing")) == []
    (tmp_path / ".lock").write_text("")
    (tmp_path / ".write_test-123").write_text("")
    (tmp_path / "checkpoints").mkdir()  # made, never saved into
    (tmp_path / "metrics.jsonl").write_text("")
    assert run_traces(str(tmp_path)) == []
    assert check_fresh_start(str(tmp_path), None, overwrite=False, move=True) is None


def test_fresh_start_in_a_run_folder_is_refused_naming_what_is_there(tmp_path):
    _old_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_fresh_start(str(tmp_path), None, overwrite=False, move=True)
    assert str(err.value) == (
        f"checkpoint.output_dir {tmp_path}: already holds a run (checkpoints/ (checkpoint_step_10); metrics.jsonl "
        f"(2 rows)); continue it with --resume auto, start elsewhere with another --output-dir, or pass "
        f"--overwrite to move the old run to {tmp_path}.old-<time> (nothing is deleted)")
    assert check_fresh_start(str(tmp_path), "auto", overwrite=False, move=True) is None  # resuming: fine


def test_overwrite_moves_the_old_run_aside_and_keeps_the_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _old_run(run)
    (run / ".lock").write_text("held")
    assert check_fresh_start(str(run), None, overwrite=True, move=False) is None  # ranks > 0 only look
    assert (run / "metrics.jsonl").exists()
    moved = check_fresh_start(str(run), None, overwrite=True, move=True)
    assert moved.parent == tmp_path and moved.name.startswith("run.old-")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    assert (moved / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    _old_run(run)
    again = check_fresh_start(str(run), None, overwrite=True, move=True)  # same second: another name
    assert again != moved and again.exists() and moved.exists()


def test_resuming_an_older_step_sets_the_later_checkpoints_aside(tmp_path):
    from moe_dist.checkpoint import layout

    run = tmp_path / "run"
    root = run / "checkpoints"
    for step in (2, 4, 6):
        folder = root / layout.step_dir_name(step)
        folder.mkdir(parents=True)
        for name in (layout.DCP_METADATA, layout.MANIFEST, layout.TRAIN_STATE):
            (folder / name).write_text("{}")
    assert [s for s, _ in layout.complete_checkpoints(root)] == [2, 4, 6]
    other = tmp_path / "other" / "checkpoints" / "checkpoint_step_2"
    assert set_aside_later_checkpoints(str(run), other, 2) == []  # another run's checkpoint: nothing moves
    assert set_aside_later_checkpoints(str(run), None, 0) == []
    assert set_aside_later_checkpoints(str(run), root / "checkpoint_step_2", 2) == [
        "checkpoint_step_4", "checkpoint_step_6"]
    assert [s for s, _ in layout.complete_checkpoints(root)] == [2]  # auto and moe-ckpt info: step 2
    (aside,) = tmp_path.glob("run.old-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["checkpoint_step_4", "checkpoint_step_6"]
