"""A checkpoint's ``train_state.json``: step, config, data cursor, format version; read without DCP.

Kept apart from ``reader.py`` (which subclasses DCP's reader) so that what only needs the JSON, the
resume pre-flight and loading a ``.pt`` or safetensors export, never imports
``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from . import layout
from .errors import CheckpointError, IncompatibleCheckpoint
from .keys import FORMAT_VERSION


def read_train_state(folder: Path) -> dict[str, Any]:
    path = folder / layout.TRAIN_STATE
    try:
        state = json.loads(path.read_text())
        int(state["step"]), state["config"]["model"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable train state ({e.__class__.__name__}: {e})") from None
    found = state.get("format_version")
    if found != FORMAT_VERSION:
        raise IncompatibleCheckpoint(f"{path}: format_version is {found!r}, this moe_dist reads checkpoints of format "
                              f"{FORMAT_VERSION} only (tensors in the model's own shapes); load it with the "
                              "moe_dist version that wrote it and export it with moe-consolidate")
    return state


def run_config(config: dict[str, Any], where: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(config)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: the stored config is not valid for this moe_dist ({e})") from None
