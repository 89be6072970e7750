"""Prepare a token store once per machine, and find it again: ``moe-prepare-data`` and first use.

``ensure_store(cfg)`` is what training calls on every rank: it returns the checked store for the
run's inputs, preparing it first if no process has yet.

* **Where**: ``<store_dir>/<tokenizer>-<key>/`` with ``key`` a SHA-256 over the inputs (each data
  file's absolute path, size and mtime; the dataset name or local folder; the built-in corpus's cap
  and Python version), the text field and the tokenizer's files. Same inputs, same folder.
* **One preparer per machine**: an exclusive ``flock`` on ``<store_dir>/.<name>.lock``. The others
  wait and log a progress line; the kernel drops the lock of a killed process, so a kill -9 leaves
  no stale lock, and the next holder removes the dead preparer's temporary folder and starts over.
* **Atomic**: tokens and header are written into ``.<name>.tmp-<host>-<pid>/``, fsync'ed, and the
  folder is renamed into place. A folder named ``<name>`` is always complete.
* **How**: local files (and the built-in corpus) go through ``datasets.map(batched=True,
  num_proc=N)``; a hub dataset (or a local dataset folder, the same code path) is read with
  ``streaming=True`` and tokenized by a pool of N processes, never loaded whole.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..cli_args import Parser
from ..checkpoint.layout import fsync_dir
from ..config import DataConfig
from ..logging_utils import get_logger
from .errors import DataError
from .store import HEADER, TOKENS, TokenStore, TokenWriter
from .encode import tokenize_into
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

_WAIT_LOG_EVERY = 10.0      # seconds between "waiting" lines


def default_store_dir() -> Path:
    return Path(os.environ.get("MOE_DIST_STORE_DIR") or Path.home() / ".cache" / "moe_dist" / "token_stores")


# --------------------------------------------------------------------------- identity
def tokenizer_identity(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer's spec plus a SHA-256 of what defines it (the files of an HF folder)."""
    spec = tok.to_spec()
    digest = hashlib.sha256(json.dumps({k: v for k, v in spec.items() if k != "path"}, sort_keys=True).encode())
    if spec["type"] == "hf":
        for p in sorted(Path(spec["path"]).iterdir()):
            if p.is_file():
                digest.update(p.name.encode() + b"\0" + p.read_bytes())
    return {**spec, "sha256": digest.hexdigest()}


def _file_stat(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def describe_sources(cfg: DataConfig) -> dict[str, Any]:
    """What the store is made of, as plain JSON: the key is a hash of this and the tokenizer."""
    if cfg.data_files and cfg.dataset:
        raise DataError(f"data.data_files ({cfg.data_files}) and data.dataset ({cfg.dataset!r}) are both set; "
                        "choose one")
    if cfg.data_files:
        for path in cfg.data_files:
            if not os.path.isfile(path):
                raise DataError(f"data file {path}: not found; check the path given to --data-files / "
                                "data.data_files")
        return {"kind": "files", "files": [_file_stat(str(p)) for p in cfg.data_files], "text_field": cfg.text_field}
    if cfg.dataset:
        src: dict[str, Any] = {"kind": "dataset", "name": cfg.dataset, "split": cfg.dataset_split,
                               "text_field": cfg.text_field}
        if os.path.isdir(cfg.dataset):  # a local copy: its files' sizes and mtimes, like data_files
            src["name"] = os.path.abspath(cfg.dataset)
            src["files"] = [_file_stat(str(p)) for p in sorted(Path(cfg.dataset).rglob("*")) if p.is_file()]
        return src
    import sysconfig

    return {"kind": "builtin", "stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version.split()[0],
            "max_corpus_bytes": cfg.max_corpus_bytes}


def store_name(sources: dict[str, Any], tok_id: dict[str, Any]) -> str:
    key = hashlib.sha256(json.dumps({"sources": sources, "tokenizer": tok_id["sha256"], "version": 1},
                                    sort_keys=True).encode()).hexdigest()
    return f"{tok_id['type']}-{key[:24]}"


# --------------------------------------------------------------------------- locking and publishing
@contextlib.contextmanager
def _exclusive(lock_path: Path, on_wait: Callable[[float], None]) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``; ``on_wait(seconds)`` is called about once a second while waiting."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                on_wait(time.monotonic() - t0)
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock (as the kernel does when the process dies)


def _check_writable(root: Path) -> None:
    probe = root / f".write_test-{socket.gethostname()}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise DataError(f"data.store_dir {root}: cannot write there ({e.strerror}); pass a writable --store-dir "
                        "(or prepare the store elsewhere with moe-prepare-data and pass --data-store)") from None


def _check_tokenizer(store: TokenStore, tok_id: dict[str, Any], tokenizer_arg: str) -> None:
    saved = store.header["tokenizer"]
    if saved.get("sha256") != tok_id["sha256"]:
        what = saved.get("path") or saved.get("type")
        raise DataError(f"token store {store.path / HEADER}: field 'tokenizer' is {what} (sha256 "
                        f"{str(saved.get('sha256'))[:12]}…), the run asks for data.tokenizer={tokenizer_arg} "
                        f"(sha256 {tok_id['sha256'][:12]}…); pass the tokenizer the store was made with, or "
                        "prepare a store with this one")


def _waiting_logger(final: Path, lock_path: Path, root: Path, name: str) -> Callable[[float], None]:
    last = {"t": -_WAIT_LOG_EVERY}

    def on_wait(seconds: float) -> None:
        if seconds - last["t"] < _WAIT_LOG_EVERY:
            return
        last["t"] = seconds
        try:
            holder = json.loads(lock_path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        written = sum(p.stat().st_size for t in root.glob(f".{name}.tmp-*") for p in t.glob(TOKENS))
        get_logger().info(f"token store {final}: waiting for pid {holder.get('pid', '?')} on "
                          f"{holder.get('host', '?')}, which prepares it ({written / 2 ** 20:,.0f} MiB of tokens "
                          f"written so far, {seconds:.0f}s waited)")

    return on_wait


def ensure_store(cfg: DataConfig, tok: Optional[Tokenizer] = None) -> TokenStore:
    """The checked token store of ``cfg``: ``cfg.store`` if given, else the one its inputs derive,
    prepared now if it does not exist yet (by one process of this machine; the others wait)."""
    tok = tok if tok is not None else load_tokenizer(cfg.tokenizer)
    tok_id = tokenizer_identity(tok)
    if cfg.store:
        if cfg.data_files or cfg.dataset:
            raise DataError(f"data.store ({cfg.store}) and data.data_files / data.dataset are both set; the store "
                            "already holds its documents: choose one")
        store = TokenStore.open(Path(cfg.store))
        _check_tokenizer(store, tok_id, cfg.tokenizer)
        if not store.is_verified():
            store.verify()
        return store
    sources = describe_sources(cfg)
    root = Path(cfg.store_dir).expanduser() if cfg.store_dir else default_store_dir()
    name = store_name(sources, tok_id)
    final = root / name
    if (final / HEADER).exists():
        store = TokenStore.open(final)
        _check_tokenizer(store, tok_id, cfg.tokenizer)
        if store.is_verified():
            return store
        if not os.access(root, os.W_OK):  # a read-only store folder: check the hash without a lock
            store.verify()
            return store
    _check_writable(root)
    lock_path = root / f".{name}.lock"
    with _exclusive(lock_path, _waiting_logger(final, lock_path, root, name)):
        if (final / HEADER).exists():  # prepared while we waited, or only the hash is left to check
            store = TokenStore.open(final)
            _check_tokenizer(store, tok_id, cfg.tokenizer)
            if not store.is_verified():
                get_logger().info(f"token store {final}: checking its SHA-256 (once after each change of the file)")
                store.verify()
            return store
        return _prepare(cfg, sources, tok, tok_id, root, name)


def _prepare(cfg: DataConfig, sources: dict[str, Any], tok: Tokenizer, tok_id: dict[str, Any], root: Path,
             name: str) -> TokenStore:
    """Write the store into a temporary folder and rename it into place (the caller holds the lock)."""
    # A killed preparation's leftovers on this machine: we hold the lock, so no process here writes them.
    # (Other hosts' folders are theirs: on a shared store_dir each machine prepares under its own lock.)
    for stale in root.glob(f".{name}.tmp-{socket.gethostname()}-*"):
        get_logger().warning(f"token store {root / name}: removing {stale}, left by a preparation that was killed")
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir()
    work = tmp / "work"
    work.mkdir()
    t0 = time.perf_counter()
    get_logger().info(f"token store {root / name}: preparing it from {_describe(sources)} "
                      f"with tokenizer {cfg.tokenizer}")
    writer = TokenWriter(tmp, tok.vocab_size)
    try:
        spec = "byte" if isinstance(tok, ByteTokenizer) else tok.to_spec()["path"]
        tokenize_into(writer, cfg, sources, spec, work)
        shutil.rmtree(work)
        seconds = time.perf_counter() - t0
        writer.finish({"tokenizer": tok_id, "eos_id": tok.eos_id, "sources": sources,
                       "prepared": {"seconds": round(seconds, 3), "host": socket.gethostname(),
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})
        fsync_dir(tmp)
        try:
            os.rename(tmp, root / name)
        except OSError as e:  # another machine sharing store_dir published it first: same inputs, use theirs
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (root / name / HEADER).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            get_logger().info(f"token store {root / name}: another machine published it first; using that one")
            return TokenStore.open(root / name)
        fsync_dir(root)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store = TokenStore.open(root / name)
    store.mark_verified()
    get_logger().info(f"token store {store.path}: {store.header['documents']:,} documents, {store.num_tokens:,} "
                      f"{store.dtype.name} tokens in {seconds:.1f}s ({store.num_tokens / max(seconds, 1e-9):,.0f} "
                      "tokens/s)")
    return store


def _describe(sources: dict[str, Any]) -> str:
    if sources["kind"] == "files":
        return f"{len(sources['files'])} data file(s)"
    if sources["kind"] == "dataset":
        return f"dataset {sources['name']!r} (streamed)"
    return f"the built-in corpus ({sources['max_corpus_bytes']:,} bytes)"


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from dataclasses import fields

    helps = {f.name: f.metadata.get("help", "") for f in fields(DataConfig)}
    p = Parser(
        prog="moe-prepare-data",
        description="Tokenize documents once into a memory-mapped token store and print its folder. Training "
                    "with the same inputs and tokenizer finds it; or pass the folder to moe-train --data-store.")
    for flag, name, kw in [("--data-files", "data_files", {"nargs": "+"}), ("--dataset", "dataset", {}),
                           ("--dataset-split", "dataset_split", {}), ("--text-field", "text_field", {}),
                           ("--tokenizer", "tokenizer", {}), ("--max-corpus-bytes", "max_corpus_bytes", {"type": int}),
                           ("--store-dir", "store_dir", {}), ("--num-proc", "num_proc", {"type": int})]:
        p.add_argument(flag, dest=name, default=None, help=f"{helps[name]} [data.{name}]", **kw)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from ..config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        cfg = DataConfig(**{k: v for k, v in vars(args).items() if v is not None})
        store = ensure_store(cfg)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h = store.header
    print(json.dumps({"store": str(store.path), "tokens": h["tokens"], "documents": h["documents"],
                      "dtype": h["dtype"], "sha256": h["sha256"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
