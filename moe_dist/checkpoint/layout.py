"""Where checkpoints live on disk, and the atomic moves that make them appear.

::

    <output-dir>/checkpoints/
        checkpoint_step_<N>/          complete checkpoints (DCP shards + .metadata + train_state.json + manifest.json)
        checkpoint_latest -> checkpoint_step_<N>   (relative symlink, replaced atomically)
        .checkpoint_step_<N>.tmp-<id>/  a save in progress; never read, removed at the next save

A folder only gets its final name after every rank has written its shards, DCP's metadata is
on disk and rank 0 has written the manifest, all fsynced; so a folder named
``checkpoint_step_<N>`` is complete by construction, and a kill at any moment leaves either the
previous state or the new one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from .errors import CheckpointError

STEP_RE = re.compile(r"^checkpoint_step_(\d+)$")
LATEST = "checkpoint_latest"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
DCP_METADATA = ".metadata"
TMP_PREFIX = "."


def checkpoints_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"checkpoint_step_{step}"


def tmp_dir_for(root: Path, step: int, token: str) -> Path:
    return root / f"{TMP_PREFIX}{step_dir_name(step)}.tmp-{token}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def is_complete(path: Path) -> bool:
    return path.is_dir() and not missing_parts(path)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete periodic checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = STEP_RE.match(entry.name)
        if m and not entry.is_symlink() and is_complete(entry):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def leftovers(root: Path) -> list[Path]:
    """Folders of saves that were killed before they completed."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(TMP_PREFIX + "checkpoint_step_") and ".tmp-" in p.name)


def publish(tmp: Path, final: Path, between_renames: Optional[Callable[[], None]] = None) -> None:
    """Rename a finished temp folder into place (replacing an older save of the same step).

    Replacing takes two renames (POSIX cannot swap folders atomically); a kill between them is
    repaired by :func:`finish_interrupted_publish`. ``between_renames`` is a test hook."""
    if final.exists():
        # Same step saved again (e.g. a resumed run re-saving): keep the old one until the new one is in.
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        if between_renames is not None:
            between_renames()
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def finish_interrupted_publish(root: Path) -> list[str]:
    """Repair what a kill between :func:`publish`'s two renames leaves: ``checkpoint_step_<N>``
    missing while its previous copy waits as ``checkpoint_step_<N>.old`` (and ``checkpoint_latest``
    may point at the missing name). The new copy, a complete temp folder, is published if there is
    one; otherwise the old copy is put back. A ``.old`` whose step folder exists is just removed.

    Rank 0 only, before choosing a checkpoint to resume. Returns one line per repair, for the log."""
    done: list[str] = []
    if not root.is_dir():
        return done
    for old in sorted(root.glob("checkpoint_step_*.old")):
        final = old.with_name(old.name[: -len(".old")])
        if not STEP_RE.match(final.name):
            continue
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name} (left by an interrupted save; {final.name} is complete)")
            continue
        new = [t for t in leftovers(root) if t.name.startswith(f"{TMP_PREFIX}{final.name}.tmp-") and is_complete(t)]
        if new:
            os.replace(new[-1], final)
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"finished publishing {final.name} (a save was killed between its renames)")
        else:
            os.replace(old, final)
            done.append(f"restored {final.name} from {old.name} (a save was killed between its renames)")
        fsync_dir(root)
    return done


def point_latest(root: Path, target: Path) -> None:
    """Atomically make ``checkpoint_latest`` a relative symlink to ``target``."""
    link = root / LATEST
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, link)
    fsync_dir(root)


def prune(root: Path, keep_last: int, protect: Optional[Path] = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; never ``protect`` (the newest)."""
    if keep_last <= 0:
        return []
    ckpts = complete_checkpoints(root)
    removed = []
    for _, path in ckpts[:-keep_last]:
        if protect is not None and path.resolve() == protect.resolve():
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def missing_parts(path: Path) -> list[str]:
    """The files a complete checkpoint has and ``path`` lacks."""
    return [n for n in (DCP_METADATA, MANIFEST, TRAIN_STATE) if not (path / n).is_file()]


def _looks_like_checkpoint(p: Path) -> bool:
    """A step folder, or a folder holding checkpoint files (complete or not)."""
    return bool(STEP_RE.match(p.name)) or any((p / n).is_file() for n in (DCP_METADATA, MANIFEST, TRAIN_STATE)) \
        or any(p.glob("*.distcp"))


def find_checkpoint(spec: str | os.PathLike) -> Path:
    """The checkpoint folder PATH names; the one rule of ``--resume``, ``moe-ckpt``, ``moe-consolidate``
    and ``load_checkpoint``:

    * a ``checkpoint_step_<N>`` folder (or any folder holding checkpoint files) is itself;
    * ``checkpoint_latest`` is the folder it points to;
    * a run folder (``--output-dir``) or its ``checkpoints/`` folder means its newest complete
      checkpoint: the one ``--resume auto`` takes (``checkpoint_latest`` can lag behind it after a
      save killed between publishing and moving the pointer).

    A named folder is not checked for completeness here (``moe-ckpt info`` shows an incomplete one);
    see :func:`require_complete`. Raises CheckpointError naming PATH and what was expected."""
    p = Path(spec)
    if p.is_symlink() and not p.exists():
        raise CheckpointError(f"{spec}: a link to {os.readlink(p)}, which does not exist (a save was interrupted); "
                              "give the run folder, or --resume auto, to take the newest complete checkpoint")
    if not p.exists():
        raise CheckpointError(f"{spec}: no such file or folder")
    if p.is_symlink():
        p = p.resolve()
    if not p.is_dir():
        from ..seed.load import looks_like_seed

        if looks_like_seed(p):
            raise CheckpointError(f"{spec}: a seed trainer checkpoint; import it once with `moe-ckpt import-seed {spec} "
                                  "--output-dir DIR`, then resume with `moe-train --config DIR/config.yaml --output-dir "
                                  "DIR --resume auto`")
        raise CheckpointError(f"{spec}: a file, not a folder; give a checkpoint_step_<N> folder, {LATEST} "
                              "or a run folder")
    if _looks_like_checkpoint(p):
        return p
    root = checkpoints_dir(str(p)) if checkpoints_dir(str(p)).is_dir() else p
    ckpts = complete_checkpoints(root)
    if ckpts:
        return ckpts[-1][1]
    latest = root / LATEST
    if latest.is_symlink() and not latest.exists():
        raise CheckpointError(f"{spec}: {latest} points to {os.readlink(latest)}, which does not exist")
    if root != p or any(STEP_RE.match(c.name) for c in p.iterdir()) or leftovers(p):
        raise CheckpointError(f"{spec}: no complete checkpoint under {root}")
    raise CheckpointError(f"{spec}: not a checkpoint (no {DCP_METADATA}, {MANIFEST} or checkpoints/ inside)")


def require_complete(path: Path, spec: Optional[str | os.PathLike] = None) -> Path:
    """``path`` if it holds every file of a complete checkpoint; CheckpointError naming ``spec`` (default
    ``path``) and the missing files otherwise."""
    missing = missing_parts(path)
    if missing:
        raise CheckpointError(f"{spec if spec is not None else path}: incomplete checkpoint (missing "
                              f"{', '.join(missing)}); it was interrupted while saving; use an earlier one")
    return path


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """:func:`find_checkpoint`, then :func:`require_complete`: a checkpoint that can be read."""
    return require_complete(find_checkpoint(spec), spec)


def resolve_resume(spec: str, output_dir: str) -> Optional[Path]:
    """Map --resume to a complete checkpoint folder; ``auto`` returns None when there is none.

    Any other value follows :func:`find_checkpoint`; errors are prefixed with ``--resume``."""
    if spec == "auto":
        ckpts = complete_checkpoints(checkpoints_dir(output_dir))
        return ckpts[-1][1] if ckpts else None
    try:
        return resolve_checkpoint(spec)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {e}") from None
