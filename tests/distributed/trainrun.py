"""Run ``moe_dist/train.py`` as N gloo ranks (through the harness) and read what it wrote."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from .harness import REPO_ROOT, RankResult, check_ranks, run_ranks

TRAIN = str(REPO_ROOT / "moe_dist" / "train.py")
CPU_JSON = str(REPO_ROOT / "launch_configs" / "cpu_zero2.json")

# A tiny model that trains in ~0.1 s a step on this machine; global batch 12 splits on 1, 2, 3, 4 ranks.
FAST = ["--preset", "tiny", "--set", "model.d_model=64", "--set", "model.d_ff=64", "--set", "model.n_heads=2",
        "--set", "train.seq_len=32", "--set", "model.max_seq_len=32", "--set", "train.micro_batch_size=1",
        "--set", "train.eval_every=0", "--set", "data.max_corpus_bytes=300000", "--set", "train.warmup_steps=2"]


def train(out: Path, world: int, *args: str, timeout: float = 180, env: Optional[dict[str, str]] = None,
          check: bool = True, stop_on_failure: bool = True) -> list[RankResult]:
    engine = ["--deepspeed-config", CPU_JSON] if "fsdp2" not in args else []  # a DeepSpeed JSON is refused by fsdp2
    argv = [TRAIN, *engine, *FAST, "--output-dir", str(out), *args]
    # DeepSpeed's Muon compiles Newton-Schulz with torch.compile (~5 s a process on CPU); the tests
    # compare runs made the same way, so they skip the compile. test_train.py runs the default path.
    env = {"TORCHDYNAMO_DISABLE": "1", **(env or {})}
    results = run_ranks(argv, world, timeout, env=env, stop_on_failure=stop_on_failure)
    return check_ranks(results) if check else results


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out)]


def by_step(rows: Sequence[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows}


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of a file, or '-> target' of a link: what 'nothing changed' compares."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
