"""What a run leaves in its folder besides checkpoints and metrics.jsonl (rank 0 only):

* ``config.yaml``: the resolved config, written at start; ``--config runs/x/config.yaml`` runs it again.
* ``loss_curve.png``: train and validation loss against tokens, drawn from the whole
  ``metrics.jsonl`` at the end of every run (a resumed run's picture covers every step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from ..checkpoint.layout import write_file_atomic
from ..config import RunConfig
from ..logging_utils import get_logger

CONFIG_FILE = "config.yaml"
CURVE_FILE = "loss_curve.png"


def write_config(cfg: RunConfig, output_dir: str) -> str:
    import yaml

    plain = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists: safe YAML
    text = ("# moe_dist resolved config; run again with: moe-train --config config.yaml\n"
            + yaml.safe_dump(plain, sort_keys=False))
    path = os.path.join(output_dir, CONFIG_FILE)
    write_file_atomic(Path(path), text.encode())
    return path


def read_metrics(path: str) -> list[dict[str, Any]]:
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a half-written last line of a killed run
    return rows


def plot_loss_curve(output_dir: str) -> Optional[str]:
    """Draw ``loss_curve.png`` from ``metrics.jsonl``; None (and one info line) without matplotlib or rows."""
    rows = read_metrics(os.path.join(output_dir, "metrics.jsonl"))
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        get_logger().info(f"{CURVE_FILE} not drawn: matplotlib is not installed (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1)
    val = [r for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"{os.path.basename(os.path.abspath(output_dir))}: steps {rows[0]['step']}-{rows[-1]['step']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, CURVE_FILE)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
