"""Encoding documents: text -> token ids into a ``TokenWriter``, in parallel: local files through ``datasets.map``
(``num_proc`` processes), a hub or local dataset folder streamed through a pool of processes, never
loaded whole (``tokenize_into``). ``data/prepare.py`` decides where the store goes and publishes it."""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import DataConfig
from .errors import DataError
from .packing import token_stream
from .store import TokenWriter
from .tokenizer import Tokenizer, load_tokenizer

_MAP_BATCH = 256            # documents per datasets.map batch
_STREAM_BATCH = 1024        # documents per streamed batch
_BYTES_PER_PROC = 32 << 20  # auto num_proc: one process per 32 MiB of text, at most one per core

_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(spec: str) -> Tokenizer:
    """One tokenizer per process (a worker loads it once, not once per batch)."""
    if spec not in _WORKER_TOKENIZERS:
        _WORKER_TOKENIZERS[spec] = load_tokenizer(spec)
    return _WORKER_TOKENIZERS[spec]


def _texts_of(values: list, field: str, where: str, first_row: int) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v is None or v == "":
            continue
        if not isinstance(v, str):
            raise DataError(f"{where}: row {first_row + i + 1} of field {field!r} is {type(v).__name__}, not text; "
                            "set data.text_field to a column of strings")
        out.append(v)
    return out


def encode_batch(texts: list[str], tokenizer_spec: str, dtype: str) -> tuple[np.ndarray, int]:
    """(tokens with one EOS after each document, documents) for one batch of non-empty texts."""
    ids = token_stream(texts, _tokenizer(tokenizer_spec)) if texts else np.zeros(0, dtype=np.int64)
    return ids.astype(dtype), len(texts)


def _map_fn(batch: dict, indices: list[int], tokenizer_spec: str, field: str, dtype: str, where: str) -> dict:
    texts = _texts_of(batch[field], field, where, indices[0] if indices else 0)
    ids, docs = encode_batch(texts, tokenizer_spec, dtype)
    return {"ids": [ids], "documents": [docs]}  # one row per batch: the order of rows is the order of documents


def _map_into(writer: TokenWriter, ds: Any, field: str, tokenizer_spec: str, num_proc: int, where: str,
              work: Path) -> int:
    """Tokenize a ``datasets.Dataset`` with ``map(batched=True, num_proc=N)`` and append it; returns documents."""
    from .corpus import _quiet_datasets

    n = max(1, min(num_proc, len(ds)))
    with _quiet_datasets():
        mapped = ds.map(_map_fn, batched=True, batch_size=_MAP_BATCH, with_indices=True, num_proc=n,
                        remove_columns=list(ds.column_names), load_from_cache_file=False,
                        cache_file_name=str(work / f"map-{len(list(work.iterdir()))}.arrow"),
                        new_fingerprint=hashlib.sha256(f"{where}|{tokenizer_spec}".encode()).hexdigest()[:16],
                        fn_kwargs={"tokenizer_spec": tokenizer_spec, "field": field, "dtype": writer.dtype.name,
                                   "where": where})
    docs = 0
    for batch in mapped.data.to_batches():
        ids = batch.column("ids").flatten().to_numpy(zero_copy_only=False)
        count = int(np.asarray(batch.column("documents")).sum())
        writer.write(ids, count)
        docs += count
    del mapped
    return docs


def _stream_batches(ds: Any, field: str, where: str) -> Iterator[list[str]]:
    row = 0
    for batch in ds.iter(batch_size=_STREAM_BATCH):
        if field not in batch:
            from .corpus import check_text_field

            check_text_field(list(batch), field, where, hint="set data.text_field")
        yield _texts_of(batch[field], field, where, row)
        row += len(batch[field])


def _stream_job(args: tuple[list[str], str, str]) -> tuple[np.ndarray, int]:
    return encode_batch(*args)


def _stream_into(writer: TokenWriter, ds: Any, field: str, tokenizer_spec: str, num_proc: int, where: str) -> int:
    """Tokenize a streamed dataset batch by batch (a pool of ``num_proc`` processes, order kept).

    At most ``2 * num_proc`` batches are in flight: ``Pool.imap`` would read the whole stream ahead
    into its task queue, i.e. hold the dataset in memory after all."""
    docs = 0
    jobs = ((texts, tokenizer_spec, writer.dtype.name) for texts in _stream_batches(ds, field, where))
    if num_proc <= 1:
        for ids, count in map(_stream_job, jobs):
            writer.write(ids, count)
            docs += count
        return docs
    pool = multiprocessing.get_context("fork").Pool(num_proc)
    try:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(_stream_job, (job,)))
            if len(pending) >= 2 * num_proc:
                ids, count = pending.popleft().get()
                writer.write(ids, count)
                docs += count
        while pending:
            ids, count = pending.popleft().get()
            writer.write(ids, count)
            docs += count
    finally:
        pool.terminate()
    return docs


def _auto_num_proc(requested: int, text_bytes: int) -> int:
    if requested:
        return requested
    return max(1, min(os.cpu_count() or 1, text_bytes // _BYTES_PER_PROC))


def tokenize_into(writer: TokenWriter, cfg: DataConfig, sources: dict[str, Any], tokenizer_spec: str,
                  work: Path) -> None:
    """Append every document of the run's inputs to ``writer``, in the order ``load_documents`` reads them."""
    from .corpus import open_file_dataset, open_hub_dataset, stdlib_documents

    if sources["kind"] == "files":
        from datasets import concatenate_datasets

        parts = []
        for f in cfg.data_files:  # one text column per file, then one map over all of them (num_proc spans files)
            ds, field = open_file_dataset(str(f), cfg.text_field, cache_dir=str(work / "hf"))
            parts.append(ds.select_columns([field]).rename_column(field, "text") if field != "text"
                         else ds.select_columns(["text"]))
        ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        where = f"data file {cfg.data_files[0]}" if len(parts) == 1 else f"data files {', '.join(cfg.data_files)}"
        n_proc = _auto_num_proc(cfg.num_proc, sum(os.path.getsize(f) for f in cfg.data_files))
        try:
            docs = _map_into(writer, ds, "text", tokenizer_spec, n_proc, where, work)
        except (UnicodeDecodeError, DataError) as e:  # name the file and line, counted from 1
            from .lines import first_bad_file_line

            found = first_bad_file_line([str(f) for f in cfg.data_files], cfg.text_field)
            if found is None and isinstance(e, DataError):
                raise
            raise DataError(found or f"{where}: cannot read it ({e}); check its format") from None
        if docs == 0:
            raise DataError(f"{where}: no text in column {cfg.text_field!r}; give files with non-empty text")
    elif sources["kind"] == "dataset":
        ds = open_hub_dataset(cfg.dataset, cfg.dataset_split, streaming=True)
        where = f"dataset {cfg.dataset!r}"
        if _stream_into(writer, ds, cfg.text_field, tokenizer_spec, cfg.num_proc or (os.cpu_count() or 1), where) == 0:
            raise DataError(f"{where} (split {cfg.dataset_split!r}): no text in column {cfg.text_field!r}")
    else:
        from datasets import Dataset

        docs = stdlib_documents(cfg.max_corpus_bytes)
        ds = Dataset.from_dict({"text": docs})
        _map_into(writer, ds, "text", tokenizer_spec, _auto_num_proc(cfg.num_proc, cfg.max_corpus_bytes),
                  "built-in corpus", work)
