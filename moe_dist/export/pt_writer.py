"""The ``.pt`` of ``moe-consolidate --format pt``, written without holding the model.

How the ``.pt`` is streamed. ``torch.save`` runs once under ``torch.serialization.skip_data`` on
FakeTensors: it writes the whole zip (pickle, records, central directory) with room reserved for
each storage's bytes. Storages are named ``data/0, data/1, ...`` in pickling order, i.e. the
state_dict order of distinct storages (the tied head shares the embedding's). Each tensor is then
written into its record's byte range, and the record's CRC-32 (data descriptor and central
directory) and torch's ``.data/serialization_id`` are patched, so the file is byte-identical to
``torch.save`` of the same dict holding real tensors (``model.state_dict()``).
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint.reader import Advance, Checkpoint
from ..logging_utils import get_logger


class _InterningPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pure-Python pickler (same bytes as the C one) that interns storage locations: FakeTensors
    report ``str(device)``, a new string each time, where real CPU tensors share one ``'cpu'``;
    interning gives the pickle the memo references a real ``torch.save`` has."""

    def save_pers(self, pid: Any) -> None:
        if isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[3], str):
            pid = pid[:3] + (sys.intern(pid[3]),) + pid[4:]
        super().save_pers(pid)


_pickle_module = type(sys)("moe_dist_interning_pickle")
_pickle_module.Pickler = _InterningPickler


@dataclass
class _Record:
    name: str
    data_offset: int
    size: int
    crc: int
    crc_offsets: list[int]  # where this record's CRC-32 is written (data descriptor or local header; central dir)


def _zip_records(path: Path) -> list[_Record]:
    """Every record of a stored (uncompressed) zip, in file order, with the places its CRC lives."""
    records = []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        infos, cd = zf.infolist(), zf.start_dir
        for info in infos:
            f.seek(info.header_offset)
            head = f.read(30)
            sig, flags, method = struct.unpack("<I2xHH", head[:10])
            n_name, n_extra = struct.unpack("<HH", head[26:30])
            assert sig == 0x04034B50 and method == zipfile.ZIP_STORED, f"unexpected zip record {info.filename}"
            data = info.header_offset + 30 + n_name + n_extra
            if flags & 0x08:  # sizes and CRC follow the data, in a data descriptor (optional signature)
                f.seek(data + info.file_size)
                crc_at = data + info.file_size + (4 if f.read(4) == b"PK\x07\x08" else 0)
            else:
                crc_at = info.header_offset + 14
            records.append(_Record(info.filename, data, info.file_size, info.CRC, [crc_at]))
        f.seek(cd)
        for rec in records:  # the central directory lists the records in the same order
            entry = f.tell()
            head = f.read(46)
            assert head[:4] == b"PK\x01\x02", "corrupt central directory"
            n, m, k = struct.unpack("<HHH", head[28:34])
            assert f.read(n).decode() == rec.name, "central directory out of order"
            rec.crc_offsets.append(entry + 16)
            f.seek(m + k, os.SEEK_CUR)
    return records


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    mask = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & mask) + (seed >> 2)) & mask)) & mask


def _combined_crc(records: list[_Record]) -> int:
    c = 0
    for r in records:
        c = _hash_combine(c, r.crc)
    return c


def write_pt(ckpt: Checkpoint, out: Path, dtype: torch.dtype, budget: int, progress: Optional[Advance]) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    lay, state = ckpt.layout, ckpt.state
    mode = FakeTensorMode()
    owners: dict[str, torch.Tensor] = {}
    sd: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    if lay.sd_metadata is not None:
        sd._metadata = lay.sd_metadata  # type: ignore[attr-defined]  # as model.state_dict() carries it
    with mode:
        for s in lay.specs:
            if s.alias_of is None:
                owners[s.name] = torch.empty(s.shape, dtype=dtype, device="cpu")
            sd[s.name] = owners[s.alias_of or s.name].detach()  # distinct tensors, shared storage
    obj = {"step": ckpt.step, "model_state_dict": sd, "config": state["config"],
           "metrics": state.get("metrics") or {}, "tokenizer": state.get("tokenizer") or {}}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(obj, out, pickle_module=_pickle_module)
    del obj, sd, owners

    records = _zip_records(out)
    prefix = records[0].name.split("/", 1)[0] + "/"
    by_name = {r.name: r for r in records}
    stored = lay.stored
    data = [by_name.get(f"{prefix}data/{i}") for i in range(len(stored))]
    for s, r in zip(stored, data):  # storages are numbered in pickling order: the state_dict's
        assert r is not None and r.size == s.numel * dtype.itemsize, f"no record of {s.numel} elements for {s.name}"
    sid = by_name.get(f"{prefix}.data/serialization_id")
    others = [r for r in records if r is not sid]
    patch_crc = torch.serialization.get_crc32_options()
    # Check torch's serialization id is the hash we know how to recompute before touching it.
    patch_sid = bool(patch_crc and sid is not None and sid.size == 40)
    if patch_sid:
        with open(out, "rb") as f:
            f.seek(sid.data_offset)
            sid_text = f.read(40).decode()
        patch_sid = sid_text[20:] == f"{_combined_crc(others):020d}"
        if not patch_sid:
            get_logger().debug("unknown torch serialization_id scheme; left as written (file still valid)")
    written = 0
    with open(out, "r+b") as f:
        for (s, t), r in zip(ckpt.iter_tensors(stored, budget, progress), data):
            buf = t.to(dtype).contiguous().view(-1).view(torch.uint8).numpy()
            f.seek(r.data_offset)
            f.write(buf)
            r.crc = zlib.crc32(buf)
            written += r.size
            del t, buf
        if patch_sid:
            text = (sid_text[:20] + f"{_combined_crc(others):020d}").encode()
            f.seek(sid.data_offset)
            f.write(text)
            sid.crc = zlib.crc32(text)
        patched = (data + [sid] if patch_sid else data) if patch_crc else []
        for r in patched:
            for at in r.crc_offsets:
                f.seek(at)
                f.write(struct.pack("<I", r.crc))
        f.flush()
        os.fsync(f.fileno())
    return written
