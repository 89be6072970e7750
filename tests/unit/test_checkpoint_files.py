"""Checkpoint layout, atomic pointer, pruning, manifest verification and the expert audit (no processes)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe_dist.checkpoint import layout
from moe_dist.checkpoint.audit import audit_experts
from moe_dist.checkpoint.errors import CheckpointError
from moe_dist.checkpoint.manifest import verify_manifest, write_manifest
from moe_dist.config import ModelConfig

from ..corrupt import flip_bits


def _fake_ckpt(root, step):
    d = root / layout.step_dir_name(step)
    d.mkdir(parents=True)
    (d / layout.DCP_METADATA).write_bytes(b"m")
    (d / layout.TRAIN_STATE).write_text(json.dumps({"step": step}))
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    write_manifest(d, {"step": step})
    return d


def test_discovery_ignores_incomplete_and_tmp(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (5, 10):
        _fake_ckpt(root, s)
    half = root / layout.step_dir_name(15)
    half.mkdir()
    (half / layout.DCP_METADATA).write_bytes(b"m")  # no manifest: a save killed midway
    layout.tmp_dir_for(root, 20, "x").mkdir()
    assert [s for s, _ in layout.complete_checkpoints(root)] == [5, 10]
    assert layout.resolve_resume("auto", str(tmp_path)).name == "checkpoint_step_10"
    assert [p.name for p in layout.leftovers(root)] == [".checkpoint_step_20.tmp-x"]
    with pytest.raises(CheckpointError, match="incomplete checkpoint .*missing manifest.json"):
        layout.resolve_resume(str(half), str(tmp_path))
    with pytest.raises(CheckpointError, match="no such file or folder"):
        layout.resolve_resume(str(tmp_path / "nope"), str(tmp_path))
    # a run folder and its checkpoints/ folder mean their newest complete checkpoint, whatever --output-dir
    assert layout.resolve_resume(str(tmp_path), str(tmp_path / "other")).name == "checkpoint_step_10"
    assert layout.resolve_resume(str(root), str(tmp_path / "other")).name == "checkpoint_step_10"
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"^--resume .*empty: no complete checkpoint under .*empty/checkpoints$"):
        layout.resolve_resume(str(tmp_path / "empty"), str(tmp_path))
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        layout.resolve_resume(str(tmp_path / "plain"), str(tmp_path))
    assert layout.resolve_resume("auto", str(tmp_path / "empty")) is None


def test_latest_pointer_and_prune(tmp_path):
    root = tmp_path / "checkpoints"
    dirs = [_fake_ckpt(root, s) for s in (1, 2, 3, 4)]
    layout.point_latest(root, dirs[-1])
    assert (root / layout.LATEST).resolve() == dirs[-1].resolve()
    assert layout.resolve_resume(str(root / layout.LATEST), str(tmp_path)) == dirs[-1].resolve()
    removed = layout.prune(root, keep_last=2, protect=dirs[-1])
    assert [p.name for p in removed] == ["checkpoint_step_1", "checkpoint_step_2"]
    assert [s for s, _ in layout.complete_checkpoints(root)] == [3, 4]
    assert layout.prune(root, keep_last=0) == []


def test_manifest_detects_truncation_and_bit_flips(tmp_path):
    d = _fake_ckpt(tmp_path, 7)
    verify_manifest(d)
    shard = d / "__0_0.distcp"
    flip_bits(shard, 100)
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: checksum \(xxh3-128\) .* differs from the manifest"):
        verify_manifest(d)
    shard.write_bytes(shard.read_bytes()[:-10])  # the flipped bytes, 10 short
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: size 1014 bytes, manifest says 1024"):
        verify_manifest(d)


def test_manifest_catches_one_flipped_bit_mid_shard_and_one_missing_byte(tmp_path):
    d = _fake_ckpt(tmp_path, 7)
    shard = d / "__1_0.distcp"
    noise = torch.randint(0, 256, (9 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shard.write_bytes(noise.numpy().tobytes())  # 9 MiB: more than one 8 MiB block of the hash loop
    write_manifest(d, {"step": 7})
    verify_manifest(d)
    whole, where = shard.read_bytes(), re.escape(str(shard))
    flip_bits(shard, mask=0x10)  # one bit of the middle byte
    with pytest.raises(CheckpointError, match=rf"^{where}: checksum \(xxh3-128\) [0-9a-f]{{12}}… differs from the "
                                              r"manifest's [0-9a-f]{12}… \(corrupted\)"):
        verify_manifest(d)
    shard.write_bytes(whole[:-1])
    with pytest.raises(CheckpointError, match=rf"^{where}: size {len(whole) - 1} bytes, manifest says {len(whole)} "
                                              r"\(truncated"):
        verify_manifest(d)
    shard.write_bytes(whole)
    verify_manifest(d)


def test_checksum_is_the_same_mapped_in_windows_or_read(tmp_path, monkeypatch):
    import mmap

    import xxhash

    from moe_dist.checkpoint import manifest

    data = bytes(range(256)) * (10 << 12) + b"tail"  # 10 MiB + 4 bytes
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    expected = xxhash.xxh3_128(data).hexdigest()
    assert manifest.file_checksum(tmp_path / "a") == expected
    assert manifest.file_checksum(tmp_path / "empty") == xxhash.xxh3_128(b"").hexdigest()
    monkeypatch.setattr(manifest, "_WINDOW", 1 << 20)  # 11 windows, the last one 4 bytes
    assert manifest.file_checksum(tmp_path / "a") == expected

    def no_mmap(*_a, **_k):
        raise OSError("mmap not supported")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    assert manifest.file_checksum(tmp_path / "a") == expected


def test_shards_are_written_without_zip_crc32_and_still_load(tmp_path):
    from moe_dist.checkpoint.manifest import without_zip_crc32

    sd = {"w": torch.arange(1000, dtype=torch.float32)}
    before = torch.serialization.get_crc32_options()
    with pytest.raises(RuntimeError, match="boom"), without_zip_crc32():
        assert torch.serialization.get_crc32_options() is False
        raise RuntimeError("boom")
    assert torch.serialization.get_crc32_options() == before  # restored, even after an error
    with without_zip_crc32():
        dcp.save(sd, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    back = {"w": torch.zeros(1000)}
    dcp.load(back, checkpoint_id=str(tmp_path / "ck"), no_dist=True)  # DCP's reader does not check the CRC
    assert torch.equal(back["w"], sd["w"])


@pytest.mark.parametrize("edit, found", [
    (lambda m: m.update(hash="sha256"), "field 'hash' is 'sha256'"),
    (lambda m: m.pop("hash") and m.update(format_version=1),
     "field 'hash' is missing (a format_version 1 manifest: SHA-256, written by an older moe_dist)"),
])
def test_manifest_of_another_checksum_algorithm_is_refused(tmp_path, edit, found):
    d = _fake_ckpt(tmp_path, 7)
    path = d / layout.MANIFEST
    m = json.loads(path.read_text())
    assert m["hash"] == "xxh3_128" and m["format_version"] == 2
    edit(m)
    path.write_text(json.dumps(m))
    msg = f"{path}: {found}, expected 'xxh3_128': this moe_dist checks only xxh3-128 checksums; use the moe_dist " \
          "version that saved this checkpoint"
    for checksums in (True, False):
        with pytest.raises(CheckpointError) as e:
            verify_manifest(d, checksums=checksums)
        assert str(e.value) == msg


def test_expert_audit(tmp_path):
    cfg = ModelConfig(d_model=8, d_ff=4, n_heads=2, num_experts=2, n_layers=1, expert_type="silu_mlp")
    full = {f"model.layers.0.ffn.experts.{e}.{m}.weight": torch.zeros(32) for e in range(2) for m in ("w_up", "w_down")}
    dcp.save(full, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    assert audit_experts(tmp_path / "ok", cfg)["experts"] == 2
    del full["model.layers.0.ffn.experts.1.w_down.weight"]
    dcp.save(full, checkpoint_id=str(tmp_path / "missing"), no_dist=True)
    with pytest.raises(CheckpointError, match="experts missing from the checkpoint: layer 0 expert 1"):
        audit_experts(tmp_path / "missing", cfg)


# ----------------------------------------------------------------------------- a kill inside publish()
def _republish_cut(tmp_path, new_complete: bool):
    """The state publish() leaves when killed between renaming step 4 aside and the new copy in."""
    root = tmp_path / "checkpoints"
    _fake_ckpt(root, 2)
    old = _fake_ckpt(root, 4)
    layout.point_latest(root, old)
    new = layout.tmp_dir_for(root, 4, "new")
    new.mkdir()
    (new / layout.DCP_METADATA).write_bytes(b"new")
    if new_complete:
        (new / layout.TRAIN_STATE).write_text(json.dumps({"step": 4, "copy": "new"}))
        write_manifest(new, {"step": 4})
    old.rename(old.with_name(old.name + ".old"))
    return root


def test_interrupted_republish_publishes_the_complete_new_copy(tmp_path):
    root = _republish_cut(tmp_path, new_complete=True)
    with pytest.raises(CheckpointError, match=r"checkpoint_latest: a link to checkpoint_step_4, which does "
                                              r"not exist \(a save was interrupted\); give the run folder, or "
                                              r"--resume auto"):
        layout.resolve_resume(str(root / layout.LATEST), str(tmp_path))
    assert layout.finish_interrupted_publish(root) == [
        "finished publishing checkpoint_step_4 (a save was killed between its renames)"]
    step4 = root / layout.step_dir_name(4)
    assert json.loads((step4 / layout.TRAIN_STATE).read_text())["copy"] == "new"
    verify_manifest(step4)
    assert layout.resolve_resume(str(root / layout.LATEST), str(tmp_path)) == step4.resolve()
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_latest", "checkpoint_step_2", "checkpoint_step_4"]
    assert layout.finish_interrupted_publish(root) == []  # idempotent


def test_interrupted_republish_without_a_complete_copy_restores_the_old_one(tmp_path):
    root = _republish_cut(tmp_path, new_complete=False)
    assert layout.finish_interrupted_publish(root) == [
        "restored checkpoint_step_4 from checkpoint_step_4.old (a save was killed between its renames)"]
    verify_manifest(root / layout.step_dir_name(4))
    assert [s for s, _ in layout.complete_checkpoints(root)] == [2, 4]
    assert [p.name for p in layout.leftovers(root)] == [".checkpoint_step_4.tmp-new"]  # removed at the next save


def test_a_superseded_old_copy_is_removed(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_ckpt(root, 4)
    (root / "checkpoint_step_4.old").mkdir()
    assert layout.finish_interrupted_publish(root) == [
        "removed checkpoint_step_4.old (left by an interrupted save; checkpoint_step_4 is complete)"]
    assert not (root / "checkpoint_step_4.old").exists()


# ----------------------------------------------------------------------------- manifest hashed by every rank
def test_manifest_uses_each_ranks_own_hashes_and_rehashes_what_does_not_match(tmp_path, monkeypatch):
    from moe_dist.checkpoint import manifest

    folder = tmp_path / "ck"
    folder.mkdir()
    for name, data in [("__0_0.distcp", b"a" * 100), ("__1_0.distcp", b"b" * 50), ("__1_1.distcp", b"c" * 7),
                       (".metadata", b"m")]:
        (folder / name).write_bytes(data)
    own = [manifest.own_shard_entries(folder, r) for r in (0, 1)]
    assert [sorted(o) for o in own] == [["__0_0.distcp"], ["__1_0.distcp", "__1_1.distcp"]]
    hashed: list[str] = []
    real = manifest.file_checksum
    monkeypatch.setattr(manifest, "file_checksum", lambda p: hashed.append(p.name) or real(p))
    stale = dict(own[1]["__1_1.distcp"], size=999)  # a precomputed entry for another size is not trusted
    written = manifest.write_manifest(folder, {"step": 1}, precomputed={**own[0], **own[1], "__1_1.distcp": stale})
    assert sorted(hashed) == [".metadata", "__1_1.distcp"]  # only what no rank hashed (or hashed stale)
    assert written["files"]["__1_0.distcp"] == own[1]["__1_0.distcp"]
    monkeypatch.setattr(manifest, "file_checksum", real)
    verify_manifest(folder)  # every entry, precomputed or not, is right
