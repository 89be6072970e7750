"""Command line of ``moe-train`` / ``moe_dist/train.py``: flags -> a validated RunConfig.

Frequent settings have their own flags (the names other tools and docs rely on); every
config field is reachable with ``--set section.field=value``; ``--help-config`` lists them
all with the help text stored on the dataclass fields, so docs and code cannot drift.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any, Optional

from .. import exit_codes
from ..cli_args import Parser
from ..config import (PRESETS, SECTIONS, ConfigError, RunConfig, _section_classes, apply_overrides, get_preset,
                     load_config_file, parse_set_args, resolve_key)


def _help(section: str, name: str) -> str:
    cls = _section_classes()[section]
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


# flag -> (section.field, argparse kwargs)
FLAG_FIELDS: dict[str, tuple[str, dict[str, Any]]] = {
    "--max-steps": ("train.max_steps", {"type": int}),
    "--seed": ("train.seed", {"type": int}),
    "--eval-every": ("train.eval_every", {"type": int}),
    "--log-every": ("train.log_every", {"type": int}),
    "--global-batch-size": ("train.global_batch_size", {"type": int}),
    "--micro-batch-size": ("train.micro_batch_size", {"type": int}),
    "--seq-len": ("train.seq_len", {"type": int}),
    "--output-dir": ("checkpoint.output_dir", {}),
    "--save-every": ("checkpoint.save_every", {"type": int}),
    "--keep-last": ("checkpoint.keep_last", {"type": int}),
    "--resume": ("checkpoint.resume", {}),
    "--init-from": ("checkpoint.init_from", {"metavar": "CKPT_OR_EXPORT"}),
    "--stop-at-step": ("checkpoint.stop_at_step", {"type": int}),
    "--engine": ("parallel.engine", {"choices": ["deepspeed", "fsdp2"]}),
    "--zero-stage": ("parallel.zero_stage", {"type": int, "choices": [1, 2, 3]}),
    "--ep-size": ("parallel.ep_size", {"type": int}),
    "--capacity-factor": ("parallel.capacity_factor", {"type": float}),
    "--init-timeout": ("parallel.init_timeout_s", {"type": float, "metavar": "SECONDS"}),
    "--train-timeout": ("parallel.train_timeout_s", {"type": float, "metavar": "SECONDS"}),
    "--data-files": ("data.data_files", {"nargs": "+"}),
    "--dataset": ("data.dataset", {}),
    "--tokenizer": ("data.tokenizer", {}),
    "--data-store": ("data.store", {}),
    "--store-dir": ("data.store_dir", {}),
    "--report-to": ("train.report_to", {"metavar": "tensorboard,wandb"}),
}
BOOL_FLAGS: dict[str, str] = {
    "--async-save": "checkpoint.async_save",
    "--offload-optimizer": "parallel.offload_optimizer",
    "--offload-params": "parallel.offload_params",
    "--activation-checkpointing": "parallel.activation_checkpointing",
    "--compile": "parallel.compile",
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="moe-train",
        description="Train a Mixture-of-Experts LM with expert parallelism under DeepSpeed ZeRO (default) or "
                    "PyTorch FSDP2 (--engine fsdp2). Launch with: accelerate launch --config_file "
                    "launch_configs/cpu.yaml moe_dist/train.py --preset tiny --max-steps 20 --output-dir runs/demo "
                    "(FSDP2: --config_file launch_configs/cpu_fsdp2.yaml ... --engine fsdp2)",
        epilog=exit_codes.help_text(),
    )
    p.add_argument("--preset", default="tiny", help=f"Starting config: one of {', '.join(PRESETS)} (default tiny).")
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of overrides ({section: {field: value}}).")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="Override any config field, e.g. --set model.d_model=256 --set train.muon_lr=0.01 "
                        "(repeatable; see --help-config).")
    p.add_argument("--lr", type=float, default=None,
                   help="Peak learning rate of the main optimizer: train.muon_lr with Muon (the default), "
                        "train.adamw_lr with --set train.optimizer=adamw. The other one keeps its value.")
    p.add_argument("--deepspeed-config", metavar="JSON",
                   help="DeepSpeed JSON to start from (default: the one the accelerate YAML names).")
    for flag, (key, kw) in FLAG_FIELDS.items():
        sec, name = key.split(".")
        p.add_argument(flag, dest=key, default=None, help=f"{_help(sec, name)} [{key}]", **kw)
    for flag, key in BOOL_FLAGS.items():
        sec, name = key.split(".")
        p.add_argument(flag, dest=key, action="store_true", default=None, help=f"{_help(sec, name)} [{key}]")
    p.add_argument("--no-verify", dest="checkpoint.verify", action="store_false", default=None,
                   help="Skip checkpoint manifest verification on resume [checkpoint.verify].")
    p.add_argument("--overwrite", action="store_true",
                   help="Start a new run in an --output-dir that holds one: move the old run to "
                        "<output-dir>.old-<time> first (nothing is deleted). Without it that start is refused.")
    p.add_argument("--verbose", action="store_true",
                   help="Also show the third-party lines a quiet console drops (DeepSpeed's per-rank op notes, ...).")
    p.add_argument("--print-params", action="store_true",
                   help="Print total and active-per-token parameters of the config and exit.")
    p.add_argument("--help-config", action="store_true",
                   help="List every config field with its value for the chosen --preset (and any overrides) "
                        "and its help.")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset, then --config file, then --set, then the dedicated flags (most specific wins)."""
    cfg = get_preset(args.preset)
    overrides: dict[str, Any] = {}
    if args.config:
        from_file = load_config_file(args.config)
        for key in from_file:
            resolve_key(key, source=f"config file {args.config}:")
        overrides.update(from_file)
    overrides.update(parse_set_args(args.set))
    for key in list(FLAG_FIELDS.values()) + [(k, {}) for k in BOOL_FLAGS.values()] + [("checkpoint.verify", {})]:
        value = getattr(args, key[0], None)
        if value is not None:
            overrides[key[0]] = value
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    if args.lr is not None:
        cfg = apply_overrides(cfg, {"train.muon_lr" if cfg.train.optimizer == "muon" else "train.adamw_lr": args.lr})
    return cfg


def config_help_text(cfg: Optional[RunConfig] = None) -> str:
    """Every field with its value in ``cfg`` (the defaults of the dataclasses when None) and its help."""
    lines = [f"values of preset {cfg.preset}" + (" with your overrides" if cfg != get_preset(cfg.preset) else "")] \
        if cfg is not None else []
    for sec in SECTIONS:
        cls = _section_classes()[sec]
        lines.append(f"[{sec}]  {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in fields(cls):
            if cfg is not None:
                default = getattr(getattr(cfg, sec), f.name)
            else:
                default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {sec}.{f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, RunConfig]:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args, config_from_args(args)


__all__ = ["build_parser", "config_from_args", "config_help_text", "parse", "ConfigError"]
