"""Changing a :class:`~moe_dist.config.sections.RunConfig` from outside: ``--set`` strings and config
files become typed overrides (``resolve_key``, ``apply_overrides``, ``load_config_file``), and a saved
architecture is compared with a requested one (``architecture_diff``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from .sections import SECTIONS, ConfigError, ModelConfig, RunConfig, _section_classes


def _coerce(value: str, current: Any, where: str) -> Any:
    """Parse a --set string into the type of the field's current value."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("none", "null"):
        return None
    try:
        if isinstance(current, bool):
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, (list, tuple)):
            parsed = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            return type(current)(parsed)
    except ValueError:
        raise ConfigError(f"{where}: cannot parse {value!r} as {type(current).__name__}") from None
    if current is None:
        # Optional field without a typed default: try number, then keep the string.
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def resolve_key(key: str, source: str = "--set") -> tuple[str, str]:
    """Map 'section.field' or a unique bare 'field' to (section, field); errors start with ``source``."""
    from ..cli_args import field_hint

    classes = _section_classes()
    known = [f"{s}.{f.name}" for s, c in classes.items() for f in fields(c)]
    if "." in key:
        sec, name = key.split(".", 1)
        if sec not in classes:
            raise ConfigError(f"{source} {key}: unknown section {sec!r}; sections are {', '.join(SECTIONS)}"
                              f"{field_hint(key, known)}")
        if name not in {f.name for f in fields(classes[sec])}:
            raise ConfigError(f"{source} {key}: {sec} has no field {name!r}{field_hint(key, known)} "
                              "(see `moe-train --help-config`)")
        return sec, name
    hits = [sec for sec, c in classes.items() if key in {f.name for f in fields(c)}]
    if not hits:
        raise ConfigError(f"{source} {key}: no config field is named {key!r}{field_hint(key, known)} "
                          "(see `moe-train --help-config`)")
    if len(hits) > 1:
        raise ConfigError(f"{source} {key}: ambiguous, exists in {', '.join(hits)}; write e.g. {hits[0]}.{key}")
    return hits[0], key


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a new, validated RunConfig with overrides (key -> value or string) applied."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        sec, name = resolve_key(key)
        d[sec][name] = _coerce(value, d[sec][name], f"{sec}.{name}")
    d["preset"] = cfg.preset
    try:
        return RunConfig.from_dict(d)
    except TypeError as e:  # wrong type reached a comparison in validation
        raise ConfigError(f"invalid override: {e}") from None


def parse_set_args(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set model.d_model=256")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML/JSON override file: either nested {section: {field: v}} or flat {'section.field': v}."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path}: not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(f"config file {path}: cannot parse ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at top level, found {type(data).__name__}")
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if k in SECTIONS and isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        elif k != "preset":
            flat[k] = v
    return flat


def architecture_diff(saved: dict, requested: ModelConfig) -> list[str]:
    """Fields of ModelConfig that differ between a saved config dict and a requested one."""
    req = dataclasses.asdict(requested)
    saved = {**{f.name: f.default for f in fields(ModelConfig)}, **saved}  # a field newer than the save: its default
    return [f"model.{k}: saved {saved.get(k)!r}, requested {v!r}" for k, v in req.items() if saved.get(k) != v]
