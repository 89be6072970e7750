"""Which checkpoint ``--resume`` picks: ``auto`` falls back past damaged saves, never past another
architecture; an explicit path is checked and refused, never replaced (no processes)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from moe_dist.checkpoint import layout
from moe_dist.checkpoint.keys import FORMAT_VERSION
from moe_dist.checkpoint.errors import CheckpointError, IncompatibleCheckpoint
from moe_dist.checkpoint.manifest import write_manifest
from moe_dist.checkpoint.resume import choose_resume, preflight_resume
from moe_dist.config import apply_overrides, get_preset

from ..corrupt import flip_bits


def _cfg(out, resume="auto", **overrides):
    cfg = get_preset("tiny")
    return apply_overrides(cfg, {"checkpoint.output_dir": str(out), "checkpoint.resume": resume, **overrides})


def _ckpt(cfg, step, model=None):
    d = layout.checkpoints_dir(cfg.checkpoint.output_dir) / layout.step_dir_name(step)
    d.mkdir(parents=True)
    (d / layout.DCP_METADATA).write_bytes(b"meta")
    state = {"format_version": FORMAT_VERSION, "step": step, "config": {"model": dataclasses.asdict(model or cfg.model)},
             "sampler": {"global_batch_size": cfg.train.global_batch_size}}
    (d / layout.TRAIN_STATE).write_text(json.dumps(state))
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 8)
    write_manifest(d, {"step": step})
    return d


def _flip(d):
    flip_bits(d / "__0_0.distcp", 100)


def test_auto_takes_the_newest_good_checkpoint_without_warnings(tmp_path):
    cfg = _cfg(tmp_path)
    _ckpt(cfg, 2), _ckpt(cfg, 4)
    warnings = []
    assert choose_resume(cfg, checksums=True, warn=warnings.append).name == "checkpoint_step_4"
    assert warnings == []


def test_auto_falls_back_past_a_bit_flip_and_says_which_file(tmp_path):
    cfg = _cfg(tmp_path)
    _ckpt(cfg, 2)
    bad = _ckpt(cfg, 4)
    _flip(bad)
    warnings = []
    assert choose_resume(cfg, checksums=True, warn=warnings.append).name == "checkpoint_step_2"
    assert len(warnings) == 2
    assert f"{bad / '__0_0.distcp'}: checksum (xxh3-128)" in warnings[0] and "(corrupted)" in warnings[0]
    assert "falling back to" in warnings[1] and "checkpoint_step_2" in warnings[1]
    assert bad.exists()  # left for inspection
    # Without checksums (the cheap every-rank preflight) a same-size bit flip is not seen: step 4.
    assert preflight_resume(cfg).name == "checkpoint_step_4"


@pytest.mark.parametrize("damage", ["truncate", "missing_file", "bad_json"])
def test_auto_falls_back_past_cheap_damage_even_without_checksums(tmp_path, damage):
    cfg = _cfg(tmp_path)
    _ckpt(cfg, 2)
    bad = _ckpt(cfg, 4)
    if damage == "truncate":
        os.truncate(bad / "__0_0.distcp", 10)
    elif damage == "missing_file":
        (bad / "__0_0.distcp").unlink()
    else:  # a train_state.json rewritten by hand, manifest regenerated: sizes agree, JSON does not parse
        (bad / layout.TRAIN_STATE).write_text("{not json")
        write_manifest(bad, {"step": 4})
    assert preflight_resume(cfg).name == "checkpoint_step_2"


def test_auto_with_every_checkpoint_damaged_refuses_with_the_newest_reason(tmp_path):
    cfg = _cfg(tmp_path)
    for step in (2, 4):
        _flip(_ckpt(cfg, step))
    with pytest.raises(CheckpointError, match=r"checkpoint_step_4/__0_0\.distcp: checksum \(xxh3-128\) .*\(and 1 older one\(s\) "
                                              r"damaged too\)"):
        choose_resume(cfg, checksums=True)


def test_auto_never_skips_another_architecture(tmp_path):
    cfg = _cfg(tmp_path)
    _ckpt(cfg, 2)
    _ckpt(cfg, 4, model=dataclasses.replace(cfg.model, num_experts=4))
    with pytest.raises(IncompatibleCheckpoint, match=r"checkpoint_step_4: checkpoint of another architecture; "
                                                     r"differing fields: model.num_experts: saved 4, requested 8"):
        choose_resume(cfg, checksums=True)


def test_auto_with_no_checkpoint_starts_fresh(tmp_path):
    assert choose_resume(_cfg(tmp_path), checksums=True) is None


def test_an_explicit_damaged_checkpoint_is_refused_not_replaced(tmp_path):
    cfg = _cfg(tmp_path)
    _ckpt(cfg, 2)
    bad = _ckpt(cfg, 4)
    _flip(bad)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(bad)))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: checksum \(xxh3-128\) .* differs"):
        choose_resume(cfg, checksums=True)


def test_another_format_version_is_refused_never_skipped(tmp_path):
    """A checkpoint whose shards are laid out another way is refused naming the field and both
    values, even when an older one would load: the older ones were written the same way."""
    cfg = _cfg(tmp_path)
    _ckpt(cfg, 2)
    newest = _ckpt(cfg, 4)
    state = json.loads((newest / layout.TRAIN_STATE).read_text())
    state["format_version"] = 1
    (newest / layout.TRAIN_STATE).write_text(json.dumps(state))
    write_manifest(newest, {"step": 4})
    with pytest.raises(IncompatibleCheckpoint, match=r"train_state.json: format_version is 1, this moe_dist reads "
                                                     r"checkpoints of format 2 only"):
        choose_resume(cfg, checksums=True)
