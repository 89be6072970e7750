"""The token store: format, preparation (num_proc, streaming, BPE), reading by memory map, and its bad inputs.

The concurrency cases run ``moe-prepare-data`` as real processes; a wrapper holds the first
preparation at a gate (a file the test creates) so the overlap is certain, not a race.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_dist.config import DataConfig
from moe_dist.data import ByteTokenizer, DataError, build_data, load_tokenizer, token_stream
from moe_dist.data.corpus import load_documents
from moe_dist.data.prepare import ensure_store
from moe_dist.data.store import HEADER, TOKENS, VERIFIED, BlockSet, TokenStore, TokenWriter, dtype_for_vocab

from ..bpe import make_bpe_tokenizer
from ..corrupt import flip_bits

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    return make_bpe_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _docs(n: int, start: int = 0) -> list[str]:
    return [f"def f{i}(x):\n    return x * {i} + {'é' * (i % 5)}\n" * (1 + i % 7) for i in range(start, start + n)]


def _store_tokens(store: TokenStore) -> np.ndarray:
    return np.fromfile(store.tokens_file, dtype=store.dtype)


# --------------------------------------------------------------------------- format
def test_dtype_is_the_smallest_that_holds_the_vocabulary(tmp_path):
    assert dtype_for_vocab(257) == np.uint16 and dtype_for_vocab(65_536) == np.uint16
    assert dtype_for_vocab(65_537) == np.uint32
    w = TokenWriter(tmp_path, vocab_size=70_000)
    ids = np.array([5, 65_535, 65_536, 69_999, 0], dtype=np.int64)
    w.write(ids, documents=1)
    header = w.finish({"tokenizer": {"type": "x", "sha256": "0"}, "eos_id": 0, "sources": {}})
    store = TokenStore.open(tmp_path)
    assert header["dtype"] == "uint32" and store.tokens_file.stat().st_size == 5 * 4
    rows = store.read_rows(1, torch.tensor([2, 3]))
    assert rows.dtype == torch.int64 and rows.tolist() == [[65_536], [69_999]]
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="produced id 70000, outside its vocabulary of 70000"):
        TokenWriter(tmp_path / "x", 70_000).write(np.array([70_000]), 1)


def test_byte_store_matches_the_in_memory_stream_and_is_reused(tmp_path):
    files = [_jsonl(tmp_path / "a.jsonl", _docs(40)), _jsonl(tmp_path / "b.jsonl", ["", *_docs(30, 40)])]
    cfg = DataConfig(data_files=[str(f) for f in files], store_dir=str(tmp_path / "stores"))
    store = ensure_store(cfg)
    ref = token_stream(load_documents(cfg), ByteTokenizer())
    np.testing.assert_array_equal(_store_tokens(store), ref)
    assert store.header["documents"] == 70 and store.header["tokens"] == ref.size and store.dtype == np.uint16
    assert store.is_verified()
    assert ensure_store(cfg).path == store.path  # same inputs, same folder
    os.utime(files[1])  # a touched input is another input: a new store
    assert ensure_store(cfg).path != store.path


def test_bpe_store_same_tokens_with_1_and_2_processes(tmp_path, bpe):
    """datasets.map(num_proc=2) splits the corpus in two shards; the store is the same bytes."""
    f = _jsonl(tmp_path / "c.jsonl", _docs(600))
    one = ensure_store(DataConfig(data_files=[str(f)], tokenizer=str(bpe), num_proc=1, store_dir=str(tmp_path / "1")))
    two = ensure_store(DataConfig(data_files=[str(f)], tokenizer=str(bpe), num_proc=2, store_dir=str(tmp_path / "2")))
    assert one.sha256 == two.sha256 and one.path.name == two.path.name
    tok = load_tokenizer(str(bpe))
    ref = token_stream(_docs(600), tok)
    np.testing.assert_array_equal(_store_tokens(one), ref)
    assert (ref == tok.eos_id).sum() == 600
    assert ref.size < 0.8 * sum(len(d) for d in _docs(600))  # merges: fewer ids than characters
    assert one.header["tokenizer"]["type"] == "hf" and one.header["vocab_size"] == 512


def test_local_dataset_folder_streams_into_the_store(tmp_path, bpe, monkeypatch):
    """The hub path (load_dataset(name, streaming=True)) on a local dataset folder, with a 2-process pool."""
    from moe_dist.data import encode

    monkeypatch.setattr(encode, "_STREAM_BATCH", 100)  # 15 batches: more than the 4 kept in flight
    folder = tmp_path / "ds"
    folder.mkdir()
    _jsonl(folder / "part-0.jsonl", _docs(900))
    _jsonl(folder / "part-1.jsonl", _docs(600, 900))
    cfg = DataConfig(dataset=str(folder), tokenizer=str(bpe), num_proc=2, store_dir=str(tmp_path / "s"))
    store = ensure_store(cfg)
    assert store.header["sources"]["kind"] == "dataset"
    np.testing.assert_array_equal(_store_tokens(store), token_stream(load_documents(cfg), load_tokenizer(str(bpe))))


def test_reading_blocks_keeps_rss_flat(tmp_path):
    """Every block of a 64 MB store read once: a kept memory map would add 64 MB to this process's RSS."""
    w = TokenWriter(tmp_path, vocab_size=257)
    chunk = (np.arange(1 << 22) % 257).astype(np.int64)
    for _ in range(8):
        w.write(chunk, 1)
    w.finish({"tokenizer": {"type": "byte", "sha256": "0"}, "eos_id": 256, "sources": {}})
    store = TokenStore.open(tmp_path)
    blocks = BlockSet(store, 1024, torch.arange(store.num_tokens // 1024))

    def rss_mb() -> float:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    before = rss_mb()
    total = 0
    for i in range(0, len(blocks), 256):
        b = blocks[i:i + 256]
        total += int(b[:, 0].sum())
    assert rss_mb() - before < 16, f"RSS grew by {rss_mb() - before:.0f} MB reading a 64 MB store"
    assert total == int(chunk.reshape(-1, 1024)[:, 0].sum()) * 8


def test_prepare_help_names_every_data_field():
    from moe_dist.data.prepare import build_parser

    text = " ".join(build_parser().format_help().split())
    for flag, key in [("--data-files", "data.data_files"), ("--dataset", "data.dataset"),
                      ("--tokenizer", "data.tokenizer"), ("--store-dir", "data.store_dir"), ("--num-proc", "data.num_proc")]:
        assert flag in text and f"[{key}]" in text
    assert "moe-train --data-store" in text


# --------------------------------------------------------------------------- bad inputs
def _small_store(tmp_path: Path) -> tuple[DataConfig, TokenStore]:
    cfg = DataConfig(max_corpus_bytes=100_000, store_dir=str(tmp_path / "stores"))
    return cfg, ensure_store(cfg)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_token_file(tmp_path):
    cfg, store = _small_store(tmp_path)
    os.truncate(store.tokens_file, store.tokens_file.stat().st_size - 2)
    with pytest.raises(DataError) as e:
        build_data(cfg, 32, 0)
    msg = _one_line(e)
    n = store.num_tokens
    assert msg == (f"token store {store.tokens_file}: size {2 * n - 2:,} bytes, the header records {n:,} uint16 "
                   f"tokens = {2 * n:,} bytes (truncated or modified file); delete the folder {store.path} and "
                   "prepare it again"), msg


def test_corrupted_token_file_is_caught_by_its_sha256(tmp_path):
    cfg, store = _small_store(tmp_path)
    assert store.is_verified()  # hashed while written: the next start does not hash again
    flip_bits(store.tokens_file, mask=0x02)
    assert not store.is_verified()  # the write changed the file's ctime
    with pytest.raises(DataError) as e:
        build_data(cfg, 32, 0)
    msg = _one_line(e)
    assert msg.startswith(f"token store {store.tokens_file}: SHA-256 ") and "differs from the header's" in msg
    assert msg.endswith(f"(corrupted file); delete the folder {store.path} and prepare it again")


def test_store_of_another_tokenizer(tmp_path, bpe):
    _, store = _small_store(tmp_path)
    with pytest.raises(DataError) as e:
        build_data(DataConfig(store=str(store.path), tokenizer=str(bpe)), 32, 0)
    msg = _one_line(e)
    assert msg.startswith(f"token store {store.path / HEADER}: field 'tokenizer' is byte (sha256 ")
    assert f"the run asks for data.tokenizer={bpe} (sha256 " in msg
    assert msg.endswith("pass the tokenizer the store was made with, or prepare a store with this one")
    assert len(build_data(DataConfig(store=str(store.path)), 32, 0).train_blocks) > 0  # the right one works


def test_store_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    with pytest.raises(DataError) as e:
        build_data(DataConfig(max_corpus_bytes=100_000, store_dir=str(blocker / "stores")), 32, 0)
    assert _one_line(e) == (f"data.store_dir {blocker / 'stores'}: cannot write there (Not a directory); pass a "
                            "writable --store-dir (or prepare the store elsewhere with moe-prepare-data and pass "
                            "--data-store)")
    assert blocker.read_text() == "keep me"


def test_not_a_store(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match=r"no store.json inside .*pass a folder written by moe-prepare-data"):
        build_data(DataConfig(store=str(tmp_path / "x")), 32, 0)


# A moe-prepare-data whose tokenizing waits for the file $TEST_GO (after writing a few tokens when
# $TEST_PARTIAL is set, as a preparation killed midway leaves them).
_GATED = """
import os, sys, time
import numpy as np
import moe_dist.data.prepare as prepare
tokenize_into = prepare.tokenize_into
def gated(writer, *args, **kwargs):
    if os.environ.get("TEST_PARTIAL"):
        writer.write(np.arange(4096) % 256, 1)
        writer._f.flush()
    while not os.path.exists(os.environ["TEST_GO"]):
        time.sleep(0.05)
    if os.environ.get("TEST_PARTIAL"):
        raise SystemExit("the partial preparation was let go; it should have been killed")
    return tokenize_into(writer, *args, **kwargs)
prepare.tokenize_into = gated
sys.exit(prepare.main(sys.argv[1:]))
"""


def _start(args: list[str], log: Path, gated: bool, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-c", _GATED, *args] if gated else [sys.executable, "-m", "moe_dist.data.prepare", *args]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), env=full_env, cwd=str(REPO),
                            text=True)


def _wait_for(cond, what: str, timeout: float = 90) -> None:  # noqa: ANN001
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_runs_preparing_at_once(tmp_path):
    """A holds the lock mid-preparation; B waits with a progress line naming A, then uses A's store."""
    stores = tmp_path / "stores"
    args = ["--max-corpus-bytes", "150000", "--store-dir", str(stores)]
    go = tmp_path / "go"
    a = _start(args, tmp_path / "a.log", gated=True, env={"TEST_GO": str(go)})
    try:
        _wait_for(lambda: list(stores.glob(".*.tmp-*")), "A's temporary folder")
        b = _start(args, tmp_path / "b.log", gated=False, env={})
        _wait_for(lambda: f"waiting for pid {a.pid}" in (tmp_path / "b.log").read_text(), "B's waiting line")
        assert not [p for p in stores.iterdir() if not p.name.startswith(".")]  # nothing published yet
        go.touch()
        out_a, out_b = a.communicate(timeout=120)[0], b.communicate(timeout=120)[0]
    finally:
        for p in (a, locals().get("b")):
            if p is not None and p.poll() is None:
                p.kill()
    assert a.returncode == 0 and b.returncode == 0, (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert json.loads(out_a) == json.loads(out_b)
    assert "preparing it" in (tmp_path / "a.log").read_text() and "preparing it" not in (tmp_path / "b.log").read_text()
    assert not list(stores.glob(".*.tmp-*"))
    store = TokenStore.open(Path(json.loads(out_a)["store"]))
    store.verify()


def test_kill_9_during_preparation_then_the_next_run_prepares_again(tmp_path):
    stores = tmp_path / "stores"
    args = ["--max-corpus-bytes", "150000", "--store-dir", str(stores)]
    a = _start(args, tmp_path / "a.log", gated=True, env={"TEST_GO": str(tmp_path / "never"), "TEST_PARTIAL": "1"})
    try:
        _wait_for(lambda: any(p.stat().st_size > 0 for p in stores.glob(f".*.tmp-*/{TOKENS}")), "A's first tokens")
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert not [p for p in stores.iterdir() if not p.name.startswith(".")]  # nothing half-written was published
    left = list(stores.glob(".*.tmp-*"))
    assert len(left) == 1
    b = _start(args, tmp_path / "b.log", gated=False, env={})
    out_b = b.communicate(timeout=120)[0]
    log = (tmp_path / "b.log").read_text()
    assert b.returncode == 0, log
    assert f"removing {left[0]}, left by a preparation that was killed" in log and "preparing it" in log
    assert not list(stores.glob(".*.tmp-*"))
    store = TokenStore.open(Path(json.loads(out_b)["store"]))
    store.verify()
    assert (store.path / VERIFIED).exists()
    ref = token_stream(load_documents(DataConfig(max_corpus_bytes=150_000)), ByteTokenizer())
    np.testing.assert_array_equal(_store_tokens(store), ref)
