"""A bad start under ``accelerate launch`` (2 processes) fails fast, says why last, and creates nothing.

Each case launches ``moe_dist/train.py`` with one mistake through ``accelerate launch`` and checks:
a non-zero exit; the ``error:`` line in the last 5 lines of the output (the launcher's
``ChildFailedError`` block ends with it: ``run/launcher_report.py``); no new file or folder next to
the ``--output-dir``; and, in the slow test, a time within 1.5x of a 2-process launch of a script
that only imports torch, measured in the same test (the floor: a launcher and two interpreters).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import REPO_ROOT
from .launcher import launch_env, launcher_cmd
from .trainrun import TRAIN

pytestmark = pytest.mark.distributed

TIME_FACTOR = 1.5


def _cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a part of the error line). Files the cases need are made under ``root``."""
    used = root / "used"
    (used / "checkpoints" / "checkpoint_step_1").mkdir(parents=True)
    (root / "empty.jsonl").write_bytes(b"")
    (root / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{"text": "\xff"}\n')
    return {
        "used_folder": (["--output-dir", str(used)], f"checkpoint.output_dir {used}: already holds a run"),
        "ep_size_3": (["--ep-size", "3"], "must be divisible by parallel.ep_size (3)"),
        "missing_data": (["--data-files", str(root / "nope.jsonl")], "nope.jsonl: not found"),
        "empty_data": (["--data-files", str(root / "empty.jsonl")], "empty.jsonl: is empty"),
        "malformed_jsonl": (["--data-files", str(root / "bad.jsonl")], "bad.jsonl: line 4: not UTF-8 text"),
        "missing_resume": (["--resume", str(root / "no_ckpt")], f"--resume {root / 'no_ckpt'}: no such file"),
        "missing_init_from": (["--init-from", str(root / "w.pt")], f"--init-from {root / 'w.pt'}: no such file"),
        "missing_tokenizer": (["--tokenizer", str(root / "tok")], f"tokenizer {root / 'tok'}: no such directory"),
        "missing_launch_json": (["--deepspeed-config", str(root / "ds.json")], "ds.json: not found"),
        "flag_typo": (["--max-step", "1"], "unknown flag --max-step; did you mean --max-steps?"),
    }


QUICK = ("used_folder", "missing_data", "malformed_jsonl", "flag_typo")


def _launch(script: str, *args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [*launcher_cmd("accelerate", 2), script, *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(root: Path, args: list[str], expect: str) -> float:
    before = _listing(root)
    out = [] if "--output-dir" in args else ["--output-dir", str(root / "run")]
    proc, seconds = _launch(TRAIN, "--preset", "tiny", *args, *out)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    last = text.strip().splitlines()[-5:]
    assert any("error: " in line and expect in line for line in last), "\n".join(last)
    assert _listing(root) == before, sorted(_listing(root) ^ before)
    return seconds


@pytest.mark.parametrize("case", QUICK)
def test_bad_start_ends_with_its_line_and_creates_nothing(case, tmp_path):
    args, expect = _cases(tmp_path)[case]
    _refused(tmp_path, args, expect)


@pytest.mark.slow
def test_every_bad_start_is_near_the_launch_floor(tmp_path):
    script = tmp_path.parent / f"{tmp_path.name}_import_torch.py"
    script.write_text("import torch\n")
    floor: list[float] = []
    times: dict[str, float] = {}
    for name, (args, expect) in _cases(tmp_path).items():
        floor.append(_launch(str(script))[1])  # interleaved: the same load for both
        # The faster of two tries: one launch's time swings by seconds on a shared machine.
        times[name] = min(_refused(tmp_path, args, expect) for _ in range(2))
    base = statistics.median(floor)
    report = {"import_torch_launch_s": round(base, 2), "cases_s": {k: round(v, 2) for k, v in times.items()},
              "load_1min": os.getloadavg()[0]}
    print(json.dumps(report), file=sys.stderr)
    slow = {k: round(v / base, 2) for k, v in times.items() if v > TIME_FACTOR * base}
    assert not slow, (slow, report)


def test_a_two_process_run_prints_no_third_party_line_of_ours(tmp_path):
    """DeepSpeed's per-rank op note is dropped (run/quiet.py); --verbose shows it again. What the
    launcher prints before our code runs is out of reach (README, Quiet console)."""
    from .trainrun import CPU_JSON, FAST

    args = [TRAIN, "--deepspeed-config", CPU_JSON, *FAST, "--max-steps", "1"]
    proc, _ = _launch(*args, "--output-dir", str(tmp_path / "quiet"))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "built successfully" not in text and "Traceback" not in text, text[-3000:]
    proc, _ = _launch(*args, "--output-dir", str(tmp_path / "verbose"), "--verbose")
    assert proc.returncode == 0 and "deepspeed_shm_comm_op built successfully" in proc.stdout + proc.stderr


def test_a_bad_line_past_the_first_lines_names_its_line_and_leaves_no_folder(tmp_path):
    """Line 151 is past what the pre-flight reads: the store preparation finds it, says which line, and
    the run folder it had made is removed again."""
    data = tmp_path / "late.jsonl"
    data.write_bytes(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(150))
                     + b'{"text": "\xff"}\n')
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, TRAIN, "--preset", "tiny", "--max-steps", "1", "--data-files", str(data),
                           "--store-dir", str(tmp_path / "stores"), "--output-dir", str(out)],
                          cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: data file {data}: line 151: not UTF-8 text (byte 0xff "
                                                    "at column 11); save the file as UTF-8")
    assert not out.exists()
