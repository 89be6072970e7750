"""Which checkpoint a run resumes from, and whether it may.

``--resume PATH`` names one checkpoint: it is checked and refused with a message if anything is
wrong. ``--resume auto`` (what a restarted job uses) takes the newest complete checkpoint under the
run's ``checkpoints/`` and, when that one is damaged (a shard truncated or bit-flipped, a file
missing, ``train_state.json`` unreadable), falls back to the next older one with a warning per
skipped folder: a corrupt newest save must not keep a restarted job down when an older good one
exists. A checkpoint of another architecture, global batch or format version is refused at once, never skipped:
older checkpoints of the same run would differ the same way, and the fix is the user's config.

The checks come in two costs: sizes, JSON and config (a few stats, every rank, before anything is
built, so a wrong ``--resume`` fails in seconds) and the checksum of every file (rank 0, once the
process group exists; ``--no-verify`` skips it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import architecture_diff
from . import layout
from .errors import CheckpointError, IncompatibleCheckpoint
from .finite import check_manifest_finite
from .manifest import verify_manifest
from .train_state import read_train_state

# Model fields that change how a model trains, not its shapes: a resume may change them.
TRAINING_ONLY_MODEL_FIELDS = ("router_noise_std", "load_balancing_weight", "init_std", "scaled_residual_init", "dropout",
                              "aux_loss_reduction")


def check_same_architecture(where: Any, saved_model: dict[str, Any], model_cfg: Any) -> None:  # noqa: ANN401
    """Raise IncompatibleCheckpoint naming each ModelConfig field that differs (training-only ones aside)."""
    saved_model = dict(saved_model)
    requested = replace(model_cfg, **{k: saved_model[k] for k in TRAINING_ONLY_MODEL_FIELDS if k in saved_model})
    diffs = architecture_diff(saved_model, requested)
    if diffs:
        raise IncompatibleCheckpoint(f"{where}: checkpoint of another architecture; differing fields: "
                                     + "; ".join(diffs) + ". Use the saved values or start a new run.")


def check_compatible(path: Path, saved: dict[str, Any], cfg: Any) -> None:  # noqa: ANN401 - RunConfig
    """Raise IncompatibleCheckpoint if ``saved``'s architecture or global batch differs from ``cfg``."""
    check_same_architecture(path, saved["config"]["model"], cfg.model)
    g_saved = saved["sampler"]["global_batch_size"]
    if g_saved != cfg.train.global_batch_size:
        raise IncompatibleCheckpoint(f"{path}: saved with train.global_batch_size={g_saved}, requested "
                                     f"{cfg.train.global_batch_size}; the data cursor counts global batches, "
                                     "so resume with the saved value")


def check_checkpoint(path: Path, cfg: Any, checksums: bool) -> dict[str, Any]:  # noqa: ANN401 - RunConfig
    """Every check short of loading the shards; returns the parsed ``train_state.json``."""
    check_manifest_finite(path, verify_manifest(path, checksums=checksums))
    saved = read_train_state(path)
    try:
        check_compatible(path, saved, cfg)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path / layout.TRAIN_STATE}: a field is missing or malformed ({e!r}); "
                              "resume from another checkpoint") from None
    return saved


def choose_resume(cfg: Any, checksums: bool,  # noqa: ANN401 - RunConfig
                  warn: Callable[[str], None] = lambda _msg: None,
                  exclude: Optional[list[Path]] = None) -> Optional[Path]:
    """The checked checkpoint to resume from, or None (no ``--resume``, or ``auto`` with none saved).
    ``exclude``: folders ``auto`` passes over (loaded and found non-finite).

    Raises CheckpointError with the reason when nothing usable is found; ``warn`` gets one line
    per damaged checkpoint that ``auto`` skipped."""
    spec = cfg.checkpoint.resume
    if not spec:
        return None
    if spec != "auto":
        path = layout.resolve_resume(spec, cfg.checkpoint.output_dir)
        assert path is not None
        check_checkpoint(path, cfg, checksums)
        return path
    root = layout.checkpoints_dir(cfg.checkpoint.output_dir)
    candidates = [p for _, p in reversed(layout.complete_checkpoints(root)) if p not in (exclude or [])]
    skipped: list[str] = []
    for path in candidates:
        try:
            check_checkpoint(path, cfg, checksums)
        except IncompatibleCheckpoint:
            raise
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        for reason in skipped:
            warn(f"--resume auto: skipping a damaged checkpoint: {reason}")
        if skipped:
            warn(f"--resume auto: falling back to {path}; the damaged folder(s) are left in place for inspection")
        return path
    if skipped:
        more = f" (and {len(skipped) - 1} older one(s) damaged too)" if len(skipped) > 1 else ""
        raise CheckpointError(skipped[0] + more)
    return None


def preflight_resume(cfg: Any) -> Optional[Path]:  # noqa: ANN401 - RunConfig
    """The cheap checks (no checksums, no warnings), on every rank before anything is built."""
    return choose_resume(cfg, checksums=False)
