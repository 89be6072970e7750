"""TensorBoard and W&B (offline) through Accelerate's tracker API: ``--report-to tensorboard,wandb``.

Accelerate owns the trackers (``Accelerator(log_with=...)``, ``init_trackers``, ``log``,
``end_training``), all on the main process only. Files go into the run folder:
``<output-dir>/tensorboard/`` (``tensorboard --logdir runs/x/tensorboard``) and
``<output-dir>/wandb/`` (an offline run; ``wandb sync runs/x/wandb/offline-run-*`` uploads it).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from ..config import ConfigError, RunConfig

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name -> the package it needs


def requested(cfg: RunConfig) -> list[str]:
    """The trackers ``train.report_to`` names, checked to be installed (one line naming the pip command)."""
    names = [n for n in cfg.train.report_to if n != "none"]
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"train.report_to: {name} needs the {TRACKERS[name]} package, which is not installed; "
                              f"pip install 'moe_dist[{name}]' (or drop it from --report-to)")
    return names


def accelerator_kwargs(names: list[str], output_dir: str) -> dict[str, Any]:
    """What ``Accelerator(...)`` takes to know the trackers (empty when there are none)."""
    if not names:
        return {}
    return {"log_with": names, "project_dir": output_dir}


def start(accelerator: Any, cfg: RunConfig, names: list[str]) -> None:
    """Open the trackers with the resolved config as hyperparameters."""
    if not names:
        return
    out = cfg.checkpoint.output_dir
    run_name = os.path.basename(os.path.abspath(out))
    init_kwargs: dict[str, Any] = {}
    if "wandb" in names:
        init_kwargs["wandb"] = {"mode": "offline", "dir": out, "name": run_name}
    # Accelerate names a tracker's folder after the project: <output-dir>/tensorboard for TensorBoard.
    accelerator.init_trackers("tensorboard" if "tensorboard" in names else run_name,
                              config=hparams(cfg), init_kwargs=init_kwargs)


def hparams(cfg: RunConfig) -> dict[str, Any]:
    """The config flattened to ``section.field`` -> bool/int/float/str (TensorBoard's hparams take no lists or None)."""
    flat: dict[str, Any] = {"preset": cfg.preset}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return flat


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics row (lists such as expert_tokens and None values left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def log(accelerator: Any, names: list[str], record: dict[str, Any]) -> None:
    if names:
        accelerator.log(scalars(record), step=int(record["step"]))


def finish(accelerator: Any, names: list[str]) -> None:
    if names:
        accelerator.end_training()
