"""The start-up checks (run/preflight.py) refuse each mistake in one message and create nothing."""

from __future__ import annotations

from argparse import Namespace

import pytest

from moe_dist.checkpoint.errors import CheckpointError
from moe_dist.config import ConfigError
from moe_dist.data.errors import DataError
from moe_dist.run.cli import parse
from moe_dist.run.preflight import preflight


def _check(tmp_path, *argv: str) -> None:
    args, cfg = parse(["--output-dir", str(tmp_path / "run"), *argv])
    before = sorted(tmp_path.rglob("*"))
    try:
        preflight(cfg, args)
    finally:
        assert sorted(tmp_path.rglob("*")) == before, "a start-up check created something"


def test_each_mistake_is_refused_before_anything_exists(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n["b"]\n')
    (tmp_path / "tok").mkdir()
    cases = [
        (["--ep-size", "3"], ConfigError, "must be divisible by parallel.ep_size (3)"),
        (["--data-files", str(tmp_path / "no.jsonl")], DataError, "no.jsonl: not found"),
        (["--data-files", str(tmp_path / "empty.jsonl")], DataError, "empty.jsonl: is empty"),
        (["--data-files", str(tmp_path / "bad.jsonl")], DataError, "bad.jsonl: line 2: a JSON list, not an object"),
        (["--resume", str(tmp_path / "none")], CheckpointError, "none: no such file or folder"),
        (["--init-from", str(tmp_path / "w.pt")], ConfigError, "w.pt: no such file or folder"),
        (["--resume", "auto", "--init-from", str(tmp_path / "w.pt")], ConfigError, "w.pt: no such file"),
        (["--tokenizer", str(tmp_path / "tok")], DataError, "the folder holds none of tokenizer.json"),
        (["--data-store", str(tmp_path / "store")], DataError, "store: no such folder"),
        (["--deepspeed-config", str(tmp_path / "ds.json")], ConfigError, "ds.json: not found"),
    ]
    for argv, error, message in cases:
        with pytest.raises(error) as e:
            _check(tmp_path, *argv)
        assert message in str(e.value), (argv, str(e.value))


def test_a_used_folder_is_refused_unless_resumed_or_overwritten(tmp_path):
    (tmp_path / "run" / "checkpoints" / "checkpoint_step_1").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        _check(tmp_path)
    _check(tmp_path, "--overwrite")  # moved aside later, by rank 0, once the run starts


def test_output_dir_below_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    args, cfg = parse(["--output-dir", str(tmp_path / "f" / "run")])
    with pytest.raises(ConfigError, match=r"cannot write there \(Not a directory\)"):
        preflight(cfg, args)


def test_a_good_start_passes(tmp_path):
    _check(tmp_path)
    preflight(parse(["--output-dir", str(tmp_path / "r")])[1], Namespace())


def test_an_empty_run_folder_of_a_refused_start_is_removed(tmp_path, monkeypatch):
    from moe_dist.run.preflight import remove_if_left_empty

    monkeypatch.setenv("RANK", "0")
    made = tmp_path / "made"
    made.mkdir()
    (made / ".lock").write_text("")
    remove_if_left_empty(str(made), fresh=True)
    assert not made.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    remove_if_left_empty(str(kept), fresh=False)  # it was there before this start
    (kept / "metrics.jsonl").write_text("{}\n")
    remove_if_left_empty(str(kept), fresh=True)  # it holds something
    assert kept.exists()
