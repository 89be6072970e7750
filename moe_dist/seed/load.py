"""Read a seed trainer checkpoint (``checkpoint_step_<N>.pt`` / ``checkpoint_latest.pt``) safely.

The file is a ``torch.save`` of ``{step, model_state_dict, optimizer_states, scheduler_states, config,
metrics}`` whose ``config`` is a pickled dataclass of the seed's code. ``torch.load(weights_only=True)``
refuses it for that one global; we map exactly the seed's two config classes to an empty stub (its
``__dict__`` then holds the saved fields, nothing of the seed runs) and still refuse any other global,
naming it. Nothing in the file is executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.errors import CheckpointError

SEED_CONFIG_CLASSES = {
    "experiments.exp4_18b_moe_training.config_4090.MoE4090Config": "4090",
    "experiments.exp4_18b_moe_training.config_18b.MoE18BConfig": "b200",
}
SEED_KEYS = ("step", "model_state_dict", "optimizer_states", "scheduler_states", "config", "metrics")


class SeedConfigStub:
    """What a seed config class unpickles to: an empty object, its saved fields in ``__dict__``."""


def _stub_class(qualname: str) -> type:
    # One class per seed class, so the file's class name survives as ``type(cfg).seed_class``.
    return type("SeedConfigStub", (SeedConfigStub,), {"seed_class": qualname})


_STUBS = {name: _stub_class(name) for name in SEED_CONFIG_CLASSES}


@dataclass
class SeedCheckpoint:
    """A seed checkpoint as read: its parts, plus which seed config class wrote it."""

    path: Path
    micro_step: int                  # the seed's ``step``: micro-batches done
    model_state: dict[str, Any]
    optimizer_states: list[dict[str, Any]]   # [Muon, AdamW]
    scheduler_states: list[dict[str, Any]]   # [LambdaLR, LambdaLR]
    config: dict[str, Any]           # the seed config's fields (and derived ones)
    config_class: str
    metrics: dict[str, Any]

    @property
    def preset(self) -> str:
        """Our preset of the seed's model: '4090' or 'b200'."""
        return SEED_CONFIG_CLASSES[self.config_class]


def looks_like_seed(path: str | Path) -> bool:
    """A ``.pt`` file (not a moe-consolidate export, which has its ``.json`` beside it) that is a zip
    ``torch.save`` naming a seed config class: a cheap sniff, nothing unpickled."""
    p = Path(path)
    if p.suffix != ".pt" or not p.is_file():
        return False
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            head = z.read(pkl) if pkl else b""
    except (OSError, zipfile.BadZipFile):
        return False
    return any(name.rsplit(".", 1)[0].encode() in head for name in SEED_CONFIG_CLASSES)


def load_seed(path: str | Path) -> SeedCheckpoint:
    """Read a seed checkpoint with ``torch.load(weights_only=True)``; CheckpointError in one line if it
    is not one or holds a global other than the seed's config classes."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file; expected a seed checkpoint (checkpoint_step_<N>.pt)")
    try:
        with torch.serialization.safe_globals([(stub, name) for name, stub in _STUBS.items()]):
            # mmap: a b200 file (~90 GB) is not read into memory
            data = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError with the global's name
        raise CheckpointError(_refusal(p, e)) from None
    if not isinstance(data, dict) or not all(k in data for k in SEED_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{p}: not a seed trainer checkpoint; expected the keys {list(SEED_KEYS)}, found {found}")
    cfg = data["config"]
    if not isinstance(cfg, SeedConfigStub):
        raise CheckpointError(f"{p}: 'config' is a {type(cfg).__name__}, expected one of the seed's config classes "
                              f"{sorted(SEED_CONFIG_CLASSES)}")
    opt, sch = data["optimizer_states"], data["scheduler_states"]
    if not (isinstance(opt, (list, tuple)) and len(opt) == 2 and isinstance(sch, (list, tuple)) and len(sch) == 2):
        def what(x: Any) -> str:  # noqa: ANN401
            return f"{type(x).__name__} of {len(x) if hasattr(x, '__len__') else '?'}"

        raise CheckpointError(f"{p}: expected optimizer_states [Muon, AdamW] and scheduler_states [LambdaLR, "
                              f"LambdaLR], found {what(opt)} and {what(sch)}")
    return SeedCheckpoint(p, int(data["step"]), dict(data["model_state_dict"]), list(opt), list(sch),
                          dict(vars(cfg)), type(cfg).seed_class, dict(data["metrics"] or {}))


def unsafe_global(e: BaseException) -> "str | None":
    """The global (``module.Class``) a ``torch.load(weights_only=True)`` error names, if any."""
    m = re.search(r"(?:Unsupported global|GLOBAL)[: ]+(?:GLOBAL )?([\w.]+)", str(e))
    return m.group(1) if m else None


def _refusal(path: Path, e: BaseException) -> str:
    text, name = str(e), unsafe_global(e)
    if name:
        return (f"{path}: refused to load: it needs the global {name}, which is neither a tensor type nor one "
                f"of the seed's config classes ({', '.join(sorted(SEED_CONFIG_CLASSES))}); nothing was executed. "
                "Re-save the file from the seed's code with only tensors and its config")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"{path}: cannot read it as a torch.save file ({type(e).__name__}: {first})"
