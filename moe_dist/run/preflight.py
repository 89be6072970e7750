"""One pre-flight check of a training run's arguments and files, before anything heavy starts.

``preflight(cfg, args)`` runs on every rank right after the command line is parsed: before the
process group, DeepSpeed, the data loader or the run folder. Each rank reads the same arguments
and the same files, so every rank reaches the same verdict on its own, with no collective: rank 0
reports the one ``error:`` line at once and the others follow with the same exit code (see
``train._fail``). Nothing is created on disk: a refused start leaves no empty run folder behind.

What it checks, cheapest first:
  the trackers ``--report-to`` names are installed; the EP degree, world size and batch against
  the launch JSON (the one layout check, ``parallel.runtime.check_layout``); ``--output-dir`` is a
  folder (or can be made) we may write to; a fresh start is not in a folder that holds a run; the
  ``--resume`` and ``--init-from`` paths; the data files exist, are not empty and their first lines
  parse; the token store and the tokenizer folder exist.

The full checks stay where they were (checksums on resume, every line of a data file as it is
read, the tokenizer as it is loaded); this one only makes the common mistakes cost seconds.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from ..data.errors import DataError
from ..exit_codes import InfraError

FIRST_LINES = 100  # lines of each data file read here; a bad line further down is found when the file is read
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class OutputDirReadOnly(InfraError):
    """The run folder's file system is mounted read-only (exit code ``INFRA``, not a usage mistake)."""


def check_output_dir(output_dir: str) -> None:
    """A folder, or a path whose nearest existing parent is a folder we may write in; nothing is made."""
    p = Path(output_dir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"checkpoint.output_dir {output_dir}: is a file, not a folder; pass a folder to --output-dir")
    where = _nearest_existing(p.absolute())
    reason = None
    if not where.is_dir():
        reason = os.strerror(errno.ENOTDIR)
    elif not os.access(where, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
        reason = os.strerror(errno.EROFS if read_only else errno.EACCES)
    if reason:
        msg = f"checkpoint.output_dir {output_dir}: cannot write there ({reason}); pass a writable --output-dir"
        if reason == os.strerror(errno.EROFS):  # a mount gone read-only: the machine's fault, worth a retry
            raise OutputDirReadOnly(msg)
        raise ConfigError(msg)


def check_data_files(cfg: RunConfig) -> None:
    """Each data file exists, is a file of a known kind, is not empty, and its first lines parse."""
    from ..data.corpus import check_data_file
    from ..data.lines import bad_line

    for path in map(str, cfg.data.data_files or ()):
        check_data_file(path)
        found = bad_line(path, cfg.data.text_field, limit=FIRST_LINES)
        if found:
            raise DataError(f"data file {path}: {found}")


def check_tokenizer_and_store(cfg: RunConfig) -> None:
    spec = cfg.data.tokenizer
    if spec and spec.strip().lower() != "byte":
        folder = Path(os.path.expanduser(spec))
        if not folder.is_dir():
            raise DataError(f"tokenizer {spec}: no such directory (hub names are not downloaded); pass 'byte' or a "
                            "local Hugging Face tokenizer folder")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise DataError(f"tokenizer {spec}: the folder holds none of {', '.join(TOKENIZER_FILES)}; pass a folder "
                            "written by AutoTokenizer.save_pretrained")
    store = cfg.data.store
    if store and not os.path.isdir(store):
        raise DataError(f"data.store {store}: no such folder; write one with moe-prepare-data or drop --data-store")


def check_checkpoint_paths(cfg: RunConfig) -> None:
    """``--resume PATH`` (sizes, JSON, architecture: no checksums) and ``--init-from`` (its header)."""
    from ..checkpoint.resume import preflight_resume

    resumed = preflight_resume(cfg)  # --resume PATH: its errors name the path and what to pass instead
    init_from = cfg.checkpoint.init_from
    if init_from and resumed is None:  # a checkpoint to resume wins over --init-from (as in train.py)
        if not os.path.exists(init_from):
            raise ConfigError(f"--init-from {init_from}: no such file or folder; pass a checkpoint folder, a "
                              "moe-consolidate .pt / safetensors export or a --format hf folder")
        from . import init_from as init_weights

        init_weights.check(init_from, cfg.model)


def preflight(cfg: RunConfig, args: Any) -> None:  # noqa: ANN401 - the parsed command line
    """Raise ConfigError / DataError / CheckpointError for the first mistake found; create nothing."""
    from ..parallel.runtime import check_layout
    from . import trackers
    from .folder import check_fresh_start

    trackers.requested(cfg)
    check_layout(cfg, getattr(args, "deepspeed_config", None))
    check_output_dir(cfg.checkpoint.output_dir)
    if os.path.isdir(cfg.checkpoint.output_dir):
        check_fresh_start(cfg.checkpoint.output_dir, cfg.checkpoint.resume, getattr(args, "overwrite", False),
                          move=False)
    check_checkpoint_paths(cfg)
    check_data_files(cfg)
    check_tokenizer_and_store(cfg)


def remove_if_left_empty(output_dir: str, fresh: bool) -> None:
    """After a start refused past these checks (a bad line deep in a data file): remove the run folder
    this start made, when it holds nothing but a lock or write probe. Rank 0 only; never raises."""
    from .folder import NOT_A_RUN, NOT_A_RUN_PREFIXES

    if not fresh or int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        names = os.listdir(output_dir)
        if all(n in NOT_A_RUN or n.startswith(NOT_A_RUN_PREFIXES) for n in names):
            for n in names:
                os.remove(os.path.join(output_dir, n))
            os.rmdir(output_dir)
    except OSError:  # gone already, or another rank's file appeared: leave it
        pass

