"""Hostile input: each case ends with exit code 2 (a failing disk: 74, retryable), one ``error:`` line
naming the problem, no traceback, and nothing that was good on disk changed.

Already covered elsewhere (not repeated here): unknown preset, missing data file, EP size that
does not divide the experts (``test_train.test_bad_input_is_one_clear_line``). ``test_resume``
checks the message of a changed architecture (d_ff and vocab_size together); here other fields,
one at a time, with the exit code and the untouched folder too. A good world-1 run
(checkpoint_step_2) is made once; every resume case works on a copy of it.

Token stores: a truncated or corrupted token file (found by its inputs or named with --data-store), a
store of another tokenizer, and a store folder that cannot be written are refused the same way.

Tests run as root, so ``chmod`` cannot make a folder read-only: the read-only cases use a
``ro`` tmpfs mount and an ``--output-dir`` below (or equal to) a regular file. The full-disk case
mounts a tmpfs sized for one checkpoint and a half (skipped where mounting is impossible); the
same failure without a mount, a per-process file-size limit (RLIMIT_FSIZE) switched on at the
step-4 save, runs everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_dist import exit_codes
from moe_dist.checkpoint import layout
from moe_dist.checkpoint.manifest import verify_manifest

from ..corrupt import flip_bits
from .harness import run_ranks
from .trainrun import CPU_JSON, FAST, TRAIN, snapshot, train

pytestmark = pytest.mark.distributed

STEP = 2


def error_line(output: str) -> str:
    """The run's one ``error:`` line; fails on a traceback or on more than one error line."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("error")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def refused(out: Path, *args: str, code: int = exit_codes.USAGE) -> str:
    """Run one rank with ``args``; assert exit ``code`` (2: a mistake in the command) and return the error line."""
    res = train(out, 1, *args, timeout=180, check=False)
    assert res[0].returncode == code, f"exit {res[0].returncode}\n{res[0].output[-3000:]}"
    return error_line(res[0].output)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "good"
    train(out, 1, "--max-steps", str(STEP), "--save-every", str(STEP))
    assert layout.is_complete(out / "checkpoints" / layout.step_dir_name(STEP))
    return out


@pytest.fixture
def run_copy(good_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(good_run, dst, symlinks=True)
    return dst


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / layout.step_dir_name(STEP)


def _shard(run: Path) -> Path:
    return next(iter(sorted(_ckpt(run).glob("*.distcp"))))


def _truncate(run: Path) -> None:
    shard = _shard(run)
    os.truncate(shard, shard.stat().st_size - 100)


def _flip_bit(run: Path) -> None:
    flip_bits(_shard(run), mask=0x10)


def _drop_manifest(run: Path) -> None:
    (_ckpt(run) / layout.MANIFEST).unlink()


def _plain_folder(run: Path) -> None:
    (run / "notes").mkdir()
    (run / "notes" / "readme.txt").write_text("not a checkpoint")


# name, how to damage the copy, --resume value (RUN = the copy), extra args, expected message parts
RESUME_CASES = [
    ("missing_path", None, "RUN/checkpoints/checkpoint_step_99", [],
     ["--resume RUN/checkpoints/checkpoint_step_99: no such file or folder"]),
    ("not_a_checkpoint", _plain_folder, "RUN/notes", [],
     ["--resume RUN/notes: not a checkpoint (no .metadata, manifest.json or checkpoints/ inside)"]),
    ("partial_no_manifest", _drop_manifest, "RUN/checkpoints/checkpoint_step_2", [],
     ["incomplete checkpoint (missing manifest.json)", "use an earlier one"]),
    ("other_architecture", None, "auto", ["--set", "model.num_experts=4"],
     ["checkpoint of another architecture", "model.num_experts: saved 8, requested 4"]),
    ("vocab_mismatch", None, "RUN/checkpoints/checkpoint_latest", ["--set", "model.vocab_size=512"],
     ["checkpoint of another architecture", "model.vocab_size: saved 320, requested 512"]),
    ("other_data", None, "auto", ["--set", "data.max_corpus_bytes=200000"],  # another corpus: refused, not replayed
     ["the training data differs from the checkpoint's (train_blocks: saved", "resume with the same data"]),
    ("other_split", None, "auto", ["--set", "data.val_fraction=0.2"],
     ["the training data differs from the checkpoint's (train_blocks: saved", "val_blocks: saved"]),
    ("truncated_shard", _truncate, "auto", [],
     ["__0_0.distcp: size", "manifest says", "(truncated or modified copy)"]),
    ("truncated_shard_no_verify", _truncate, "auto", ["--no-verify"],  # sizes are checked even then
     ["__0_0.distcp: size", "(truncated or modified copy)"]),
    ("bit_flipped_shard", _flip_bit, "auto", [],
     ["__0_0.distcp: checksum (xxh3-128)", "differs from the manifest's", "(corrupted)"]),
]


@pytest.mark.parametrize("name, damage, resume, args, expect", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_bad_resume_is_refused_and_nothing_changes(run_copy, name, damage, resume, args, expect):
    if damage is not None:
        damage(run_copy)
    before = snapshot(run_copy)
    line = refused(run_copy, "--max-steps", "4", "--save-every", "2",
                   "--resume", resume.replace("RUN", str(run_copy)), *args)
    for part in expect:
        assert part.replace("RUN", str(run_copy)) in line, line
    assert snapshot(run_copy) == before  # no checkpoint, pointer or metrics row touched


def test_checks_run_before_the_engine_is_built(run_copy):
    """Path, completeness, sizes and architecture are checked first: a wrong --resume costs seconds.
    (Checksums come later, on rank 0 once the process group exists: hashing is the slow part.)"""
    res = train(run_copy, 1, "--resume", str(run_copy / "nope"), timeout=120, check=False)
    assert res[0].returncode == 2
    assert "DeepSpeed ZeRO" not in res[0].output  # the engine's first log line


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = refused(tmp_path / "out", "--data-files", str(empty))
    assert line == f"error: data file {empty}: is empty; give a file with text in it"


def _prepared_store(tmp_path: Path) -> Path:
    """A store of FAST's built-in corpus (300 kB) in a folder of its own."""
    from moe_dist.config import DataConfig
    from moe_dist.data.prepare import ensure_store

    return ensure_store(DataConfig(max_corpus_bytes=300_000, store_dir=str(tmp_path / "stores"))).path


def _truncate_store(store: Path) -> None:
    os.truncate(store / "tokens.bin", (store / "tokens.bin").stat().st_size - 64)


def _flip_store(store: Path) -> None:
    flip_bits(store / "tokens.bin", mask=0x20)


@pytest.mark.parametrize("damage, expect", [
    (_truncate_store, ["tokens.bin: size", "(truncated or modified file); delete the folder"]),
    (_flip_store, ["tokens.bin: SHA-256", "(corrupted file); delete the folder"]),
], ids=["truncated", "corrupted"])
def test_damaged_token_store(tmp_path, damage, expect):
    store = _prepared_store(tmp_path)
    damage(store)
    before = snapshot(store)
    for how in (["--store-dir", str(tmp_path / "stores")], ["--data-store", str(store)]):  # found, or named
        line = refused(tmp_path / "out", *how)
        assert line.startswith(f"error: token store {store / 'tokens.bin'}: "), line
        assert f"{store} and prepare it again" in line, line
        assert all(part in line for part in expect), line
    assert snapshot(store) == before  # a damaged store is reported, never rewritten in place


def test_store_of_another_tokenizer(tmp_path):
    from ..bpe import make_bpe_tokenizer

    store = _prepared_store(tmp_path)
    tok = make_bpe_tokenizer(tmp_path / "bpe")
    line = refused(tmp_path / "out", "--data-store", str(store), "--tokenizer", str(tok),
                   "--set", "model.vocab_size=512")
    assert line.startswith(f"error: token store {store / 'store.json'}: field 'tokenizer' is byte"), line
    assert f"the run asks for data.tokenizer={tok}" in line and "prepare a store with this one" in line


def test_store_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    line = refused(tmp_path / "out", "--store-dir", str(blocker / "stores"))
    assert line == (f"error: data.store_dir {blocker / 'stores'}: cannot write there (Not a directory); pass a "
                    "writable --store-dir (or prepare the store elsewhere with moe-prepare-data and pass --data-store)")
    assert blocker.read_text() == "keep me"


def test_vocab_smaller_than_tokenizer(tmp_path):
    line = refused(tmp_path / "out", "--set", "model.vocab_size=200")
    assert "model.vocab_size (200) is smaller than the tokenizer's vocabulary (" in line
    assert "set --set model.vocab_size=" in line


def test_ep_size_that_does_not_divide_world(tmp_path):
    line = refused(tmp_path / "out", "--ep-size", "2")
    assert line == ("error: world size (1) must be divisible by parallel.ep_size (2); with 1 processes choose "
                    "--ep-size from 1, or launch a multiple of 2 processes")
    assert not (tmp_path / "out").exists(), "a refused layout must not leave a run folder behind"


@pytest.mark.parametrize("where", ["below_a_file", "is_a_file"])
def test_output_dir_that_is_not_a_folder(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    out = blocker / "run" if where == "below_a_file" else blocker
    res = train(out, 1, "--max-steps", "2", timeout=120, check=False)
    assert res[0].returncode == 2, res[0].output[-3000:]
    line = error_line(res[0].output)
    if where == "below_a_file":
        assert line == (f"error: checkpoint.output_dir {out}: cannot write there (Not a directory); "
                        "pass a writable --output-dir")
    else:
        assert line == f"error: checkpoint.output_dir {out}: is a file, not a folder; pass a folder to --output-dir"
    assert blocker.read_text() == "keep me"


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return proc.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_read_only_output_dir(tmp_path):
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (not root / no CAP_SYS_ADMIN); the file cases above still run")
    try:
        line = refused(mnt / "run", code=exit_codes.INFRA)  # the machine's fault, worth a retry elsewhere
    finally:
        _umount(mnt)
    assert line == (f"error: checkpoint.output_dir {mnt / 'run'}: cannot write there (Read-only file system); "
                    "pass a writable --output-dir")


def _assert_failed_save_left_step2_intact(out: Path, line: str, reason: str) -> None:
    root = out / "checkpoints"
    assert line.startswith(f"error: saving checkpoint_step_4 in {root} failed: "), line
    assert reason in line, line
    assert line.endswith("nothing was published, checkpoint_step_2 and checkpoint_latest are untouched"), line
    assert [s for s, _ in layout.complete_checkpoints(root)] == [2]
    assert (root / layout.LATEST).resolve() == (root / layout.step_dir_name(2)).resolve()
    verify_manifest(root / layout.step_dir_name(2))  # sizes and checksums: the old checkpoint is whole
    assert layout.leftovers(root) == []  # the failed temp folder was removed


def _rank0_reports_save_failure(res) -> str:  # noqa: ANN001 - list[RankResult]
    """A failed save raises the same error on every rank; rank 0 prints it, the others exit quietly, all
    with the retryable infrastructure code.

    The harness kills the other ranks as soon as one exits (as torchrun does), so this also
    checks that no rank can exit before rank 0 has printed (they meet at a barrier in shutdown).
    """
    codes = [r.returncode for r in res]
    assert set(codes) <= {exit_codes.INFRA, None} and exit_codes.INFRA in codes, "\n".join(r.output[-3000:] for r in res)
    assert all("Traceback" not in r.output for r in res), "\n".join(r.output[-3000:] for r in res)
    for r in res[1:]:
        assert not [ln for ln in r.output.splitlines() if ln.startswith("error")], r.output[-3000:]
    return error_line(res[0].output)


def test_full_disk_during_save(good_run, tmp_path):
    """A tmpfs that holds one checkpoint and a half: the step-2 save fits, the step-4 one cannot."""
    ckpt_bytes = sum(p.stat().st_size for p in _ckpt(good_run).iterdir())
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, f"size={(ckpt_bytes * 3 // 2) // 1024}k"):
        pytest.skip("cannot mount a tmpfs here; test_file_size_limit_during_save covers the failing write")
    try:
        out = mnt / "run"
        res = train(out, 2, "--max-steps", "6", "--save-every", "2", timeout=180, check=False)
        line = _rank0_reports_save_failure(res)
        # which rank hits the wall first varies: its open() fails (ENOSPC), or torch.save's writer comes up short
        assert ("No space left on device" in line or "a shard file was written short" in line), line
        assert "MiB free there" in line, line
        _assert_failed_save_left_step2_intact(out, line, "rank ")
    finally:
        _umount(mnt)


# Runs moe_dist/train.py with a per-process file-size limit (RLIMIT_FSIZE) switched on when the
# step-4 save starts (earlier, it would also stop torch's compiler caches): with SIGXFSZ ignored,
# a write past the limit fails with EFBIG ("File too large"). Needs neither root nor a mount.
_FSIZE_WRAPPER = """
import os, resource, runpy, signal, sys
import moe_dist.checkpoint.manager as manager
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit, at_step = int(os.environ["TEST_FSIZE_LIMIT"]), int(os.environ["TEST_FSIZE_STEP"])
on_rank = os.environ.get("TEST_FSIZE_RANK", os.environ.get("RANK", "0"))
save = manager.CheckpointManager.save
def limited_save(self):
    if self.trainer.state.step >= at_step and os.environ.get("RANK", "0") == on_rank:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return save(self)
manager.CheckpointManager.save = limited_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("world", [1, 2])
def test_file_size_limit_during_save(good_run, tmp_path, world):
    """The same failure without a mount: shard writes of the step-4 save hit a file-size limit.

    With 2 ranks only rank 1's writes are limited: rank 0 learns of it through DCP, reports it
    (naming rank 1), and is not killed before it has, although rank 1 has nothing to print."""
    out = tmp_path / "run"
    argv = ["-c", _FSIZE_WRAPPER, TRAIN, "--deepspeed-config", CPU_JSON, *FAST, "--output-dir", str(out),
            "--max-steps", "6", "--save-every", "2"]
    limit = _shard(good_run).stat().st_size // 8  # below any rank's shard of this model
    env = {"TEST_FSIZE_LIMIT": str(limit), "TEST_FSIZE_STEP": "4", "TEST_FSIZE_RANK": str(world - 1)}
    res = run_ranks(argv, world, timeout=180, env=env)
    line = _rank0_reports_save_failure(res)
    # The limit is hit either inside torch.save's zip writer, which swallows the EFBIG and reports a
    # short write, or by a plain write, which raises it: which one depends on where the box lands.
    reason = next((r for r in ("a shard file was written short", "File too large") if r in line), "neither reason")
    _assert_failed_save_left_step2_intact(out, line, reason)
    if world == 2:
        assert "failed: rank 1: " in line, line
