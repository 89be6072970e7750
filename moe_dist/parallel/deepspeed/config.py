"""Build the DeepSpeed config a run actually uses: the launch config's JSON, then our RunConfig.

The launch JSON (``launch_configs/*.json``) holds what belongs to the machine (ZeRO stage,
offload, bucket sizes, bf16); the RunConfig holds what belongs to the experiment (batch,
optimizer, LRs, clipping). CLI flags (``--zero-stage``, ``--set parallel.offload_optimizer=true``)
override the JSON. Every ``"auto"`` is resolved here, because outside HF's Trainer nothing else
resolves them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from ...config import ConfigError, RunConfig
from ...logging_utils import warn_once
from ..dims import batch_layout

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                          "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


def read_launch_json(path: Optional[str]) -> dict[str, Any]:
    if not path:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {path}: not found (the launch YAML's deepspeed_config_file names it)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def muon_supported(zero_stage: int, ds: dict[str, Any]) -> bool:
    """DeepSpeed's Muon runs under ZeRO-1/2, and under ZeRO-3 only without reduce-scatter."""
    if zero_stage < 3:
        return True
    return not ds.get("zero_optimization", {}).get("reduce_scatter", True)


def build_ds_config(cfg: RunConfig, base: dict[str, Any], world_size: int, on_gpu: bool) -> dict[str, Any]:
    """Merge the launch JSON with the RunConfig into a complete DeepSpeed config (no 'auto' left)."""
    ds = copy.deepcopy(base)
    layout = batch_layout(cfg, world_size)
    ds["train_micro_batch_size_per_gpu"] = layout.micro_batch_size
    ds["gradient_accumulation_steps"] = layout.grad_accum
    ds["train_batch_size"] = layout.global_batch_size
    ds.setdefault("steps_per_print", 10**9)

    zero = ds.setdefault("zero_optimization", {})
    if cfg.parallel.zero_stage is not None:
        zero["stage"] = cfg.parallel.zero_stage
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2, 3):
        raise ConfigError(f"zero_optimization.stage: expected 1, 2 or 3, found {stage}; set --zero-stage")
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            zero[key] = {"stage3_param_persistence_threshold": 10 * cfg.model.d_model}.get(key, 50_000_000)
    if cfg.parallel.offload_optimizer is not None:
        zero["offload_optimizer"] = {"device": "cpu" if cfg.parallel.offload_optimizer else "none"}
    if cfg.parallel.offload_params is not None:
        zero["offload_param"] = {"device": "cpu" if cfg.parallel.offload_params else "none"}
    if zero.get("offload_param", {}).get("device", "none") != "none" and stage != 3:
        raise ConfigError(f"parallel.offload_params needs ZeRO stage 3, found stage {stage}; use --zero-stage 3")

    if world_size == 1 and stage < 3:
        # One rank: the mean over one rank is the identity, yet ZeRO-1/2 still divide the flat gradients
        # by 1.0 at every reduction (a full pass over them; DeepSpeed refuses 'sum' under ZeRO-3). A sum
        # over one rank gives the same numbers without that pass.
        ds.setdefault("gradient_allreduce_op", "sum")
    precision = cfg.parallel.resolved_precision(on_gpu)
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": False}

    t = cfg.train
    if t.optimizer == "muon" and stage == 3 and "reduce_scatter" not in zero:
        # DeepSpeed's Muon needs each full gradient on one rank under ZeRO-3, which its reduce-scatter
        # path does not provide; with reduce_scatter off it works (tested in test_zero_dcp/test_resume).
        zero["reduce_scatter"] = False
    if t.optimizer == "muon" and not muon_supported(stage, ds):
        warn_once("DeepSpeed's Muon does not run under ZeRO-3 with reduce_scatter (your DeepSpeed JSON sets it "
                  "true); training ALL parameters with AdamW (lr = train.adamw_lr) instead. Remove "
                  "zero_optimization.reduce_scatter or use ZeRO-1/2 to keep Muon.")
        optimizer = "adamw"
    else:
        optimizer = t.optimizer
    if optimizer == "muon":
        if t.grad_clip:  # set by the user: the default (None) means off with Muon
            # DeepSpeed's ZeRO Muon writes the orthogonalised update into the gradient buffer before
            # the clip norm is taken, so the "gradient norm" it clips is that of the Muon updates
            # (~sqrt(sum of matrix widths), ~80 on the tiny preset): clipping at 1.0 shrank every step
            # ~80x and the tiny model stopped learning (measured). Muon updates are normalised already.
            warn_once(f"train.grad_clip={t.grad_clip} is not applied with the Muon optimizer (DeepSpeed would clip "
                      "the orthogonalised updates, not the gradients); use --set train.optimizer=adamw to clip")
        ds["gradient_clipping"] = 0.0
        ds["optimizer"] = {"type": "Muon", "params": {
            "lr": t.adamw_lr, "muon_lr": t.muon_lr, "adam_lr": t.adamw_lr, "momentum": t.muon_momentum,
            "betas": list(t.adam_betas), "eps": 1e-8, "weight_decay": t.weight_decay}}
    else:
        ds["gradient_clipping"] = t.clip_norm()
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": t.adamw_lr, "betas": list(t.adam_betas), "eps": 1e-8, "weight_decay": t.weight_decay}}
    if not on_gpu and zero.get("offload_optimizer", {}).get("device", "none") == "none":
        # FusedAdam needs CUDA; on CPU (and for Muon's auxiliary Adam) use torch's AdamW.
        ds["optimizer"]["params"]["torch_adam"] = True
    ds.pop("scheduler", None)  # the LR schedule is ours (moe_dist.run.optim), stepped per optimizer step
    leftovers = [k for k, v in _walk(ds) if v == "auto"]
    if leftovers:
        raise ConfigError(f"DeepSpeed config still has 'auto' for {', '.join(leftovers)}; give explicit values")
    return ds


def optimizer_kind(ds: dict[str, Any]) -> str:
    return "muon" if ds["optimizer"]["type"] == "Muon" else "adamw"


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d
