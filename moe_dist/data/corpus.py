"""Where documents come from: the built-in offline corpus, local data files, or a hub dataset.

``load_documents(cfg)`` returns a list of strings, one per document, in a deterministic order.

* no ``data_files`` and no ``dataset``: the ``.py`` files of Python's own standard library
  (tests, idlelib, site-packages and machine-specific build files left out), sorted by path and cut
  at ``max_corpus_bytes``. Real text that exists on every machine, so demos and tests need no download.
* ``data_files``: ``.txt`` (one document per file), ``.json``/``.jsonl`` and ``.parquet`` (one
  document per row, column ``text_field``), read with ``datasets.load_dataset``'s packaged builders,
  which need no network.
* ``dataset``: ``load_dataset(name, split=dataset_split)``, a hub name or a local copy.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import DataConfig
from .errors import DataError

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_documents(cfg: DataConfig) -> list[str]:
    if cfg.data_files and cfg.dataset:
        raise DataError(f"data.data_files ({cfg.data_files}) and data.dataset ({cfg.dataset!r}) are both set; "
                        "choose one")
    if cfg.data_files:
        docs: list[str] = []
        for path in cfg.data_files:
            docs.extend(_load_file(str(path), cfg.text_field))
        return docs
    if cfg.dataset:
        return _load_hub(cfg.dataset, cfg.dataset_split, cfg.text_field)
    return stdlib_documents(cfg.max_corpus_bytes)


# --------------------------------------------------------------------------- built-in corpus
def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for d, dirs, files in os.walk(root):
        # config-3.x-<platform>/ and _sysconfigdata_*.py describe this machine's build: not portable text.
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS and not x.startswith("config-")]
        found += [Path(d, f) for f in files if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def stdlib_documents(max_bytes: int) -> list[str]:
    """One document per stdlib file until ``max_bytes`` UTF-8 bytes are read (the last file is cut)."""
    if max_bytes <= 0:
        raise DataError(f"data.max_corpus_bytes: expected a positive number of bytes, found {max_bytes}")
    docs: list[str] = []
    left = max_bytes
    for path in stdlib_files():
        data = path.read_bytes()[:left]
        if data:
            # A cut may split a multi-byte character: 'ignore' drops the partial tail only.
            docs.append(data.decode("utf-8", errors="ignore" if len(data) == left else "replace"))
        left -= len(data)
        if left <= 0:
            break
    if not docs:
        raise DataError(f"built-in corpus: no .py files under {sysconfig.get_paths()['stdlib']}; "
                        "pass --data-files with local text instead")
    return docs


# --------------------------------------------------------------------------- local files
@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars (every rank would draw them) and no error logs (we raise DataError) while reading files."""
    from datasets.utils import logging as ds_logging

    bars_on, verbosity = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars_on:
            ds_logging.enable_progress_bar()


def _folder_hint(path: str) -> str:
    """The message for a folder given where files are expected: which files it holds, and the glob to pass."""
    counts: dict[str, int] = {}
    for name in os.listdir(path):
        ext = Path(name).suffix.lower()
        if ext in _BUILDERS and os.path.isfile(os.path.join(path, name)):
            counts[ext] = counts.get(ext, 0) + 1
    if not counts:
        return (f"data file {path}: is a folder with no {'/'.join(sorted(_BUILDERS))} files in it; "
                "pass the files themselves to --data-files")
    held = ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items()))
    best = max(counts, key=lambda e: counts[e])
    return (f"data file {path}: is a folder ({held} files); --data-files takes files, e.g. "
            f"--data-files {os.path.join(path, '*' + best)}")


def _load_file(path: str, text_field: str) -> list[str]:
    ds, field = open_file_dataset(path, text_field)
    try:
        docs = _texts(ds, field, f"data file {path}", hint="set data.text_field")
    except (UnicodeDecodeError, DataError) as e:  # pyarrow keeps undecodable bytes until a row is read
        from .lines import bad_line

        found = bad_line(path, field)  # a row number -> the file's line number, when a line is to blame
        if found is None and isinstance(e, DataError):
            raise
        raise DataError(f"data file {path}: {found}" if found else f"data file {path}: cannot read it ({e}); "
                        "check its format") from None
    if not docs:
        raise DataError(f"data file {path}: no text in column {field!r}; give a file with non-empty text")
    return docs


def check_data_file(path: str) -> str:
    """Refuse a data file that cannot be read (a folder, an unknown extension, missing, empty); returns its
    extension. The one rule, for the pre-flight check and the loader alike."""
    ext = Path(path).suffix.lower()
    if os.path.isdir(path):
        raise DataError(_folder_hint(path))
    if ext not in _BUILDERS:
        raise DataError(f"data file {path}: unknown extension {ext or '(none)'!r}; "
                        f"use one of {', '.join(sorted(_BUILDERS))}")
    if not os.path.isfile(path):
        raise DataError(f"data file {path}: not found; check the path given to --data-files / data.data_files")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path}: is empty; give a file with text in it")
    return ext


def open_file_dataset(path: str, text_field: str, cache_dir: Optional[str] = None) -> tuple[Any, str]:
    """One local data file as a ``datasets.Dataset`` and the name of its text column (checked present)."""
    builder = _BUILDERS[check_data_file(path)]
    field = "text" if builder == "text" else text_field
    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    from datasets import load_dataset

    try:
        with _quiet_datasets():
            ds = load_dataset(builder, data_files=[os.path.abspath(path)], split="train", cache_dir=cache_dir,
                              **kwargs)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line naming the file
        cause = e.__cause__ or e.__context__ or e
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else cause.__class__.__name__
        raise DataError(_bad_line_message(path, field, f"cannot read it as {builder} ({msg})")) from None
    check_text_field(ds.column_names, field, f"data file {path}", hint="set data.text_field")
    return ds, field


def _bad_line_message(path: str, text_field: str, fallback: str) -> str:
    """The first bad line, 1-based, in plain words; ``fallback`` (the reader's own words) when no line is."""
    from .lines import bad_line

    found = bad_line(path, text_field)
    return f"data file {path}: {found}" if found else f"data file {path}: {fallback}; check its format"


def check_text_field(columns: Optional[list], field: str, where: str, hint: str) -> None:
    columns = list(columns or [])
    if field not in columns:
        raise DataError(f"{where}: has no text field {field!r}; columns found: {', '.join(columns) or '(none)'}; "
                        f"{hint}")


def _texts(ds: Any, field: str, where: str, hint: str) -> list[str]:
    check_text_field(ds.column_names, field, where, hint)
    out: list[str] = []
    for i, value in enumerate(ds[field]):
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: row {i + 1} of field {field!r} is {type(value).__name__}, not text; "
                            f"{hint} to a column of strings")
        if value:
            out.append(value)
    return out


# --------------------------------------------------------------------------- hub
def open_hub_dataset(name: str, split: str, streaming: bool = False) -> Any:
    """``load_dataset(name, split=split)``: a hub name or a local folder; ``streaming`` reads it lazily."""
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - network/offline/missing all become one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"dataset {name!r} (split {split!r}): cannot load it ({e.__class__.__name__}: {first}); "
                        "hub datasets need a network or a local copy: pass a local folder of the "
                        "dataset's files as data.dataset, or pass --data-files") from None


def _load_hub(name: str, split: str, text_field: str) -> list[str]:
    ds = open_hub_dataset(name, split)
    docs = _texts(ds, text_field, f"dataset {name!r}", hint="set data.text_field")
    if not docs:
        raise DataError(f"dataset {name!r} (split {split!r}): no text in column {text_field!r}")
    return docs
