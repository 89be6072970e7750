"""The stale JIT-build lock warning: the hang it guards against made a whole CI run time out."""

from __future__ import annotations

import os
import time

from moe_dist.parallel.deepspeed import jit_locks


def _lock(path, age_s):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_finds_old_locks_in_both_layouts_and_ignores_fresh_ones(tmp_path):
    old_default = _lock(tmp_path / "py311_cpu" / "cpu_adam" / "lock", 3600)
    old_flat = _lock(tmp_path / "deepspeed_shm_comm" / "lock", 900)
    _lock(tmp_path / "py311_cpu" / "fused_adam" / "lock", 30)  # a build in progress
    (tmp_path / "py311_cpu" / "cpu_adam" / "cpu_adam.so").touch()
    found = jit_locks.stale_build_locks(tmp_path)
    assert [p for p, _ in found] == sorted([old_default, old_flat])
    assert all(age >= 900 for _, age in found)


def test_warning_names_the_file_and_the_fix(tmp_path, monkeypatch):
    lock = _lock(tmp_path / "cpu_adam" / "lock", 7200)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lines: list[str] = []
    assert [p for p, _ in jit_locks.warn_stale_build_locks(lines.append)] == [lock]
    assert len(lines) == 1 and str(lock) in lines[0] and "120 min old" in lines[0]
    assert f"rm {lock}" in lines[0]


def test_no_root_no_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "absent"))
    assert jit_locks.warn_stale_build_locks(lambda m: None) == []
