"""The token store: one flat file of token ids plus a JSON header, read by memory map.

A store is a folder::

    <store>/tokens.bin    doc_0 EOS doc_1 EOS ... doc_n EOS, in the smallest dtype holding the vocabulary
                          (uint16 up to 65,535 ids, else uint32), native little-endian
    <store>/store.json    format, dtype, tokenizer (spec + SHA-256 of its files), vocab_size, eos_id,
                          tokens, documents, sources, and the SHA-256 of tokens.bin computed while writing
    <store>/verified.json optional: the (size, mtime, ctime, inode) of tokens.bin whose SHA-256 was last
                          checked against the header on this machine

``TokenWriter`` writes a store into a temporary folder (``prepare.py`` renames it into place);
``TokenStore.open`` checks a published one; ``TokenStore.read_rows`` cuts blocks out of a fresh
memory map and converts them to int64, so a rank's memory holds one batch, never the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import DataError, StoreReadError

FORMAT = "moe_dist-token-store"
VERSION = 1
TOKENS = "tokens.bin"
HEADER = "store.json"
VERIFIED = "verified.json"
_HASH_CHUNK = 16 << 20  # bytes read per hash update: constant memory whatever the file size


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536, ids 0..65,535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenWriter:
    """Appends token arrays to ``<folder>/tokens.bin`` and hashes them on the way; ``finish`` writes the header."""

    def __init__(self, folder: Path, vocab_size: int) -> None:
        self.folder = Path(folder)
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size = vocab_size
        self.tokens = 0
        self.documents = 0
        self._sha = hashlib.sha256()
        self._f = open(self.folder / TOKENS, "wb")

    def write(self, ids: np.ndarray, documents: int) -> None:
        """Append ``ids`` (already with one EOS after each of its ``documents`` documents)."""
        arr = np.ascontiguousarray(ids, dtype=self.dtype)
        if arr.size and int(arr.max()) >= self.vocab_size:
            raise DataError(f"token store {self.folder}: the tokenizer produced id {int(arr.max())}, outside its "
                            f"vocabulary of {self.vocab_size}; check the tokenizer folder")
        data = arr.tobytes()
        self._f.write(data)
        self._sha.update(data)
        self.tokens += int(arr.size)
        self.documents += int(documents)

    def finish(self, header: dict[str, Any]) -> dict[str, Any]:
        """Flush and fsync the token file, then write the header; returns the header."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        header = {"format": FORMAT, "version": VERSION, **header, "dtype": self.dtype.name,
                  "vocab_size": self.vocab_size, "tokens": self.tokens, "documents": self.documents,
                  "sha256": self._sha.hexdigest()}
        write_json(self.folder / HEADER, header)
        return header

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` through a temporary file, fsync, then rename: never a half-written JSON."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


@dataclass
class TokenStore:
    path: Path
    header: dict[str, Any]

    @property
    def tokens_file(self) -> Path:
        return self.path / TOKENS

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.header["dtype"])

    @property
    def num_tokens(self) -> int:
        return int(self.header["tokens"])

    @property
    def sha256(self) -> str:
        return str(self.header["sha256"])

    # ------------------------------------------------------------------ open and check
    @classmethod
    def open(cls, path: Path) -> "TokenStore":
        """Read the header and check that the token file has exactly the size it records.

        A size check is O(1) and catches a truncated or extended file; :meth:`verify` checks content."""
        path = Path(path)
        hdr_path = path / HEADER
        try:
            header = json.loads(hdr_path.read_text())
        except FileNotFoundError:
            raise DataError(f"token store {path}: no {HEADER} inside (not a token store, or one whose preparation "
                            "never finished); pass a folder written by moe-prepare-data") from None
        except (OSError, ValueError) as e:
            raise DataError(f"token store {hdr_path}: unreadable ({e.__class__.__name__}: {e}); delete the folder "
                            f"{path} and prepare it again") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            found = header.get("format") if isinstance(header, dict) else header
            raise DataError(f"token store {hdr_path}: field 'format' is {found!r}, expected {FORMAT!r}; pass a folder "
                            "written by moe-prepare-data")
        if header.get("version") != VERSION:
            raise DataError(f"token store {hdr_path}: field 'version' is {header.get('version')!r}, this moe_dist "
                            f"reads version {VERSION}; prepare the store again with this version")
        missing = [k for k in ("dtype", "tokens", "documents", "vocab_size", "eos_id", "sha256", "tokenizer")
                   if k not in header]
        if missing:
            raise DataError(f"token store {hdr_path}: fields missing: {', '.join(missing)}; delete the folder {path} "
                            "and prepare it again")
        store = cls(path, header)
        expected = store.num_tokens * store.dtype.itemsize
        try:
            found = store.tokens_file.stat().st_size
        except FileNotFoundError:
            raise DataError(f"token store {path}: {TOKENS} is missing; delete the folder {path} and prepare it "
                            "again") from None
        if found != expected:
            raise DataError(f"token store {store.tokens_file}: size {found:,} bytes, the header records "
                            f"{store.num_tokens:,} {store.dtype.name} tokens = {expected:,} bytes (truncated or "
                            f"modified file); delete the folder {path} and prepare it again")
        return store

    def _stat_key(self) -> dict[str, Any]:
        st = self.tokens_file.stat()
        # ctime cannot be set from user space: any write to the file, or a copy, changes it.
        return {"host": socket.gethostname(), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "sha256": self.sha256}

    def is_verified(self) -> bool:
        """True if this machine has checked the token file's SHA-256 since its last change."""
        try:
            return json.loads((self.path / VERIFIED).read_text()) == self._stat_key()
        except (OSError, ValueError):
            return False

    def verify(self) -> None:
        """Hash the token file (16 MiB at a time) and compare with the header; record success.

        Raises DataError naming both hashes when they differ. The record is skipped when the folder
        is read-only (the next start hashes again)."""
        before = self._stat_key()
        found = file_sha256(self.tokens_file)
        if found != self.sha256:
            raise DataError(f"token store {self.tokens_file}: SHA-256 {found[:16]}… differs from the header's "
                            f"{self.sha256[:16]}… (corrupted file); delete the folder {self.path} and prepare "
                            "it again")
        if self._stat_key() == before:
            try:
                write_json(self.path / VERIFIED, before)
            except OSError:
                pass

    def mark_verified(self) -> None:
        """Record the freshly written file as verified (its hash was computed while writing it)."""
        write_json(self.path / VERIFIED, self._stat_key())

    # ------------------------------------------------------------------ read
    def read_rows(self, width: int, rows: torch.Tensor) -> torch.Tensor:
        """Blocks ``rows`` (block ``i`` = tokens ``[i*width, (i+1)*width)``) as an int64 ``[len(rows), width]``.

        The map is opened for this call and dropped after the copy (as nanoGPT does): pages of a
        long-lived map stay counted in the process's RSS once touched, so over an epoch a kept map
        would grow every rank's RSS to the corpus size."""
        n_blocks = self.num_tokens // width
        try:
            mm = np.memmap(self.tokens_file, dtype=self.dtype, mode="r", shape=(n_blocks, width))
        except (OSError, ValueError) as e:  # cut short or removed under the running job
            raise self._read_error(e) from None
        try:
            picked = mm[rows.numpy()]  # a copy of just these rows
        finally:
            del mm
        return torch.from_numpy(picked.astype(np.int64))


    def _read_error(self, e: BaseException) -> StoreReadError:
        try:
            found = f"{self.tokens_file.stat().st_size:,} bytes"
        except OSError as gone:
            found = gone.strerror or "gone"
        want = self.num_tokens * self.dtype.itemsize
        return StoreReadError(f"token store {self.tokens_file}: cannot read it mid-run ({e}): its header says "
                              f"{want:,} bytes, the file is {found}; the store changed under the running job: "
                              "restore it (or delete its folder to prepare it again), then rerun with --resume auto")


class BlockSet:
    """A set of disjoint blocks of one store: ``len``, ``size(0)``, ``shape``, and indexing by
    an int, a slice or a LongTensor of positions, which returns an int64 CPU tensor ``[B, width]``."""

    def __init__(self, store: TokenStore, width: int, rows: torch.Tensor) -> None:
        self.store, self.width = store, width
        self.rows = rows.to(device="cpu", dtype=torch.int64)  # [N] block numbers in the store, sorted

    def __len__(self) -> int:
        return int(self.rows.numel())

    def size(self, dim: Optional[int] = None) -> Any:
        shape = torch.Size([len(self), self.width])
        return shape if dim is None else shape[dim]

    @property
    def shape(self) -> torch.Size:
        return self.size()

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, int):
            return self.store.read_rows(self.width, self.rows[key:key + 1])[0]
        if isinstance(key, slice):
            return self.store.read_rows(self.width, self.rows[key])
        if isinstance(key, torch.Tensor):
            return self.store.read_rows(self.width, self.rows[key.to(device="cpu", dtype=torch.int64)])
        raise TypeError(f"BlockSet indices must be int, slice or LongTensor, not {type(key).__name__}")

    def __repr__(self) -> str:
        return f"BlockSet({self.store.path}, {len(self)} blocks of {self.width})"
