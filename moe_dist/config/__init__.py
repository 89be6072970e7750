"""Configuration: the run's dataclasses, their validation and overrides (``config/sections.py``) and the
named presets (``config/presets.py``). Import from here: ``from moe_dist.config import RunConfig, get_preset``."""

from .presets import FLOAT32_EPS, PRESETS, SEED_MODEL_OPTIONS, get_preset
from .overrides import apply_overrides, architecture_diff, load_config_file, parse_set_args, resolve_key
from .sections import (SECTIONS, CheckpointConfig, ConfigError, DataConfig, ModelConfig, ParallelConfig, RunConfig,
                       TrainConfig, _section_classes)

__all__ = ["FLOAT32_EPS", "PRESETS", "SEED_MODEL_OPTIONS", "SECTIONS", "CheckpointConfig", "ConfigError", "DataConfig",
           "ModelConfig", "ParallelConfig", "RunConfig", "TrainConfig", "_section_classes", "apply_overrides", "architecture_diff", "get_preset",
           "load_config_file", "parse_set_args", "resolve_key"]
