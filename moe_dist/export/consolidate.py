"""Offline consolidation: a DCP training checkpoint -> one ``.pt`` file or a safetensors export.

::

    moe-consolidate runs/x/checkpoints/checkpoint_latest          # -> runs/x/checkpoints/consolidated_step_<N>.pt
    moe-consolidate CKPT -o model.pt --dtype bf16 --verify
    moe-consolidate CKPT --format safetensors --max-shard-size 2GB -o export/   # Hugging Face layout
    moe-consolidate CKPT --format hf -o hf_model/     # transformers' MixtralForCausalLM (see export_hf)

One process, CPU only: no process group, no DeepSpeed. Only the ``model.*`` keys are read
(optimizer states and RNG are never touched), a few tensors at a time: each batch (at most
``--read-budget`` bytes, or one tensor) is one ``dcp.load`` into preallocated 1-D destinations,
which reads just their byte ranges and assembles the chunks every ZeRO / expert-parallel rank
wrote. Peak memory is therefore about one batch (or the largest tensor), not the model.

How the ``.pt`` is streamed. ``torch.save`` runs once under ``torch.serialization.skip_data`` on
FakeTensors: it writes the whole zip (pickle, records, central directory) with room reserved for
each storage's bytes. Storages are named ``data/0, data/1, ...`` in pickling order, i.e. the
state_dict order of distinct storages (the tied head shares the embedding's). Each tensor is then
written into its record's byte range, and the record's CRC-32 (data descriptor and central
directory) and torch's ``.data/serialization_id`` are patched, so the file is byte-identical to
``torch.save`` of the same dict holding real tensors (``model.state_dict()``).

Outputs (``<ckpts>`` is the folder holding the checkpoint, i.e. ``CHECKPOINT/..``):

* ``--format pt`` (default ``<ckpts>/consolidated_step_<N>.pt``): ``{"step", "model_state_dict",
  "config", "metrics", "tokenizer"}``, keys of ``model_state_dict`` exactly ``model.state_dict()``'s;
  ``torch.load(path, weights_only=True)`` reads it.
* ``--format safetensors`` (default folder ``<ckpts>/consolidated_step_<N>/``): ``model.safetensors``,
  or above ``--max-shard-size`` (default 2GB) ``model-0000i-of-0000n.safetensors`` plus
  ``model.safetensors.index.json``; ``config.json`` (Hugging Face fields, ``model_type: moe_dist``) and
  ``moe_dist_config.json`` (step, run config, metrics, tokenizer). The tied head is not stored twice
  (``tie_word_embeddings``). Memory: about two shards (one and its serialized bytes) plus the read buffer.
* ``--format hf`` (default folder ``<ckpts>/consolidated_step_<N>_hf/``): the same shards under Mixtral's
  tensor names, a Mixtral ``config.json``, ``generation_config.json`` and the tokenizer files, loadable by
  ``transformers.AutoModelForCausalLM.from_pretrained`` (``export_hf``).

The tokenizer travels with every output: its spec (a Hugging Face tokenizer's with its files embedded)
sits in the ``.pt`` and in ``moe_dist_config.json``; ``--format hf`` writes the tokenizer files.

Exit codes: 0 done, 1 ``--verify`` found a difference, 2 a user error (one line, no traceback).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pickle
import shutil
import struct
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..checkpoint import layout
from ..checkpoint.reader import DEFAULT_READ_BUDGET, Advance, Checkpoint, TensorSpec, read_train_state
from ..checkpoint.errors import CheckpointError
from ..config import ConfigError, ModelConfig
from ..logging_utils import get_logger

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD = "2GB"
SAFETENSORS_SINGLE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
MOE_CONFIG = "moe_dist_config.json"


class ConsolidateError(RuntimeError):
    """A user-facing problem with the output or the flags; the message says what to do."""


# ============================================================================ .pt, streamed
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


def _write_pt(ckpt: Checkpoint, out: Path, dtype: torch.dtype, budget: int, progress: Optional[Advance]) -> int:
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


# ============================================================================ safetensors
def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json``: the usual Hugging Face names for the architecture, plus our own config."""
    return {
        "architectures": ["MoETransformer"], "model_type": "moe_dist",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "expert_type": cfg.expert_type,
        "torch_dtype": str(dtype).removeprefix("torch."), "moe_dist": dataclasses.asdict(cfg),
    }


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a shard closes before it would pass ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nbytes = s.numel * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def write_safetensors_shards(ckpt: Checkpoint, out: Path, dtype: torch.dtype, max_shard: int, budget: int,
                             progress: Optional[Advance],
                             rename: Callable[[str], str] = lambda name: name) -> tuple[int, list[str]]:
    """The model's stored tensors as ``model.safetensors``, or above ``max_shard`` bytes numbered shards and
    ``model.safetensors.index.json``, under ``rename(state_dict name)``. Returns (bytes, file names)."""
    from safetensors.torch import save_file

    stored = ckpt.layout.stored
    shards = _plan_shards(stored, dtype.itemsize, max_shard)
    n = len(shards)
    files = [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    tensors = ckpt.iter_tensors(stored, budget, progress)
    weight_map, total = {}, 0
    umask = os.umask(0)
    os.umask(umask)
    for shard, fname in zip(shards, files):
        part = {}
        for _ in shard:
            s, t = next(tensors)
            key = rename(s.name)
            part[key] = t.to(dtype, copy=True)  # t is a view into the reader's reused buffer
            weight_map[key] = fname
            total += part[key].nbytes
            del t
        save_file(part, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o666 & ~umask)  # safetensors creates files 0600
        del part
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total, files


def _write_safetensors(ckpt: Checkpoint, out: Path, dtype: torch.dtype, max_shard: int, budget: int,
                       progress: Optional[Advance]) -> int:
    total, files = write_safetensors_shards(ckpt, out, dtype, max_shard, budget, progress)
    cfg = ckpt.config.model
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
    info = {"format": "moe_dist-consolidated", "format_version": 1, "step": ckpt.step,
            "tokens": ckpt.state.get("tokens"), "dtype": str(dtype).removeprefix("torch."),
            "source": ckpt.folder.name, "files": files,
            "tied": {s.name: s.alias_of for s in ckpt.layout.specs if s.alias_of},
            "config": ckpt.state["config"], "tokenizer": ckpt.state.get("tokenizer") or {},
            "metrics": ckpt.state.get("metrics") or {}}
    (out / MOE_CONFIG).write_text(json.dumps(info, indent=1) + "\n")
    return total


def safetensors_files(folder: Path, index: Optional[Path] = None) -> list[Path]:
    """The weight files of a safetensors export: those its index names, or the single file."""
    index = index or folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e.__class__.__name__}: {e})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names weight files that are missing: {', '.join(missing[:3])}")
        return [folder / n for n in names]
    if (folder / SAFETENSORS_SINGLE).is_file():
        return [folder / SAFETENSORS_SINGLE]
    raise CheckpointError(f"{folder}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} inside")


# ============================================================================ verify
def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def verify_output(ckpt: Checkpoint, out: Path, fmt: str, dtype: torch.dtype, budget: int,
                  progress: Optional[Advance] = None) -> int:
    """Reload ``out`` and compare every tensor with the checkpoint, bit for bit after the cast.
    Returns the number of tensors compared; raises ConsolidateError on the first difference."""
    specs = ckpt.layout.specs
    if fmt == "pt":
        obj = torch.load(out, map_location="cpu", weights_only=True, mmap=True)
        sd = obj["model_state_dict"]
        if list(sd) != [s.name for s in specs] or obj["step"] != ckpt.step:
            raise ConsolidateError(f"verify: {out} holds other keys or another step than the checkpoint")
        get = sd.__getitem__
    else:
        from safetensors import safe_open

        from .hf import hf_tensor_name

        rename = hf_tensor_name if fmt == "hf" else (lambda name: name)
        handles = {}
        for path in safetensors_files(out):
            with safe_open(str(path), "pt") as f:
                handles.update({k: path for k in f.keys()})
        if set(handles) != {rename(s.name) for s in ckpt.layout.stored}:
            raise ConsolidateError(f"verify: {out} holds other tensors than the checkpoint's model")

        def get(name: str) -> torch.Tensor:
            with safe_open(str(handles[rename(name)]), "pt") as f:
                return f.get_tensor(rename(name))
    for s, t in ckpt.iter_tensors(ckpt.layout.stored, budget, progress):
        if not _same_bits(get(s.name), t.to(dtype)):
            raise ConsolidateError(f"verify: {s.name} in {out} differs from {s.source} in {ckpt.folder}")
    for s in specs:
        if s.alias_of and fmt == "pt" and not _same_bits(get(s.name), get(s.alias_of)):
            raise ConsolidateError(f"verify: tied {s.name} differs from {s.alias_of} in {out}")
    return len(ckpt.layout.stored)


# ============================================================================ driver
@dataclass
class Result:
    out: Path
    step: int
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    verified: Optional[int] = None


def default_output(folder: Path, step: int, fmt: str) -> Path:
    return folder.parent / (f"consolidated_step_{step}" + {"pt": ".pt", "safetensors": "", "hf": "_hf"}[fmt])


def _check_output(out: Path, folder: Path, fmt: str, force: bool) -> None:
    if out.resolve().is_relative_to(folder.resolve()):
        raise ConsolidateError(f"output {out} is inside the checkpoint {folder}; writing there would break its "
                               "manifest; choose another -o")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ConsolidateError(f"output {out} already exists; pass --force to replace it or choose another -o")
    if fmt == "pt" and not out.is_file():
        raise ConsolidateError(f"output {out} exists and is not a file; --force only replaces a .pt file")
    if fmt == "safetensors" and not (out.is_dir() and ((out / MOE_CONFIG).is_file() or not any(out.iterdir()))):
        raise ConsolidateError(f"output {out} exists and is not an earlier safetensors export (no {MOE_CONFIG}); "
                               "--force only replaces those, remove it yourself")
    if fmt == "hf" and not (out.is_dir() and (is_hf_export(out) or not any(out.iterdir()))):
        raise ConsolidateError(f"output {out} exists and is not an earlier --format hf export (no config.json from "
                               "moe-consolidate); --force only replaces those, remove it yourself")


def is_hf_export(folder: Path) -> bool:
    """Whether ``folder`` holds a ``--format hf`` export written by moe-consolidate."""
    from .hf import HF_MARKER

    try:
        return HF_MARKER in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def consolidate(checkpoint: str | os.PathLike, out: Optional[str | os.PathLike] = None, dtype: str = "fp32",
                fmt: str = "pt", max_shard_size: Optional[str | int] = None, verify: bool = False,
                verify_manifest: bool = True, force: bool = False, read_budget: str | int = DEFAULT_READ_BUDGET,
                progress: Optional[Callable[[str, int], Advance]] = None, tokenizer: Optional[str] = None) -> Result:
    """Write the model of a DCP checkpoint as a ``.pt``, a safetensors or an hf export (see module doc).
    ``tokenizer`` ('byte' or a folder) is stored instead of the checkpoint's own.

    ``progress(description, total_bytes)`` may return a per-bytes callback (the CLI's rich bar)."""
    from ..plan.units import parse_bytes

    if dtype not in DTYPES:
        raise ConsolidateError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if fmt not in ("pt", "safetensors", "hf"):
        raise ConsolidateError(f"--format {fmt}: expected 'pt', 'safetensors' or 'hf'")
    if max_shard_size is not None and fmt == "pt":
        raise ConsolidateError("--max-shard-size only applies to --format safetensors or hf (a .pt is one file)")
    try:
        budget = read_budget if isinstance(read_budget, int) else parse_bytes(read_budget)
        max_shard = parse_bytes(str(max_shard_size or DEFAULT_MAX_SHARD))
    except ConfigError as e:
        raise ConsolidateError(str(e)) from None
    if budget <= 0 or max_shard <= 0:
        raise ConsolidateError("--read-budget and --max-shard-size must be positive")
    torch_dtype = DTYPES[dtype]

    folder = layout.resolve_checkpoint(checkpoint)
    step = int(read_train_state(folder)["step"])
    out_path = Path(out) if out is not None else default_output(folder, step, fmt)
    _check_output(out_path, folder, fmt, force)
    ckpt = Checkpoint(folder, verify=verify_manifest)
    if tokenizer is not None:
        ckpt.state["tokenizer"] = _tokenizer_spec(tokenizer, ckpt.config.model.vocab_size)
    if fmt == "hf":
        from .hf import check_exportable

        check_exportable(ckpt.config.model)  # before anything is written

    t0 = time.perf_counter()
    total_read = sum(s.numel * ckpt.stored_dtype(s).itemsize for s in ckpt.layout.stored)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        bar = progress("consolidating", total_read) if progress else None
        if fmt == "pt":
            tmp = tmp_dir / out_path.name  # same file name: torch names the zip's folder after it
            written = _write_pt(ckpt, tmp, torch_dtype, budget, bar)
            os.replace(tmp, out_path)
        else:
            if fmt == "hf":
                from .hf import write_hf

                written = write_hf(ckpt, tmp_dir, torch_dtype, max_shard, budget, bar)
            else:
                written = _write_safetensors(ckpt, tmp_dir, torch_dtype, max_shard, budget, bar)
            if out_path.exists():
                shutil.rmtree(out_path)
            os.replace(tmp_dir, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    layout.fsync_dir(out_path.parent)
    res = Result(out_path, step, len(ckpt.layout.specs), total_read, written, time.perf_counter() - t0)
    if verify:
        bar = progress("verifying", total_read) if progress else None
        res.verified = verify_output(ckpt, out_path, fmt, torch_dtype, budget, bar)
    return res


def _tokenizer_spec(tokenizer: str, model_vocab: int) -> dict[str, Any]:
    from ..data.errors import DataError
    from ..data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(tokenizer)
    except DataError as e:
        raise ConsolidateError(f"--tokenizer: {e}") from None
    if tok.vocab_size > model_vocab:
        raise ConsolidateError(f"--tokenizer {tokenizer}: {tok.vocab_size} ids, the model only has {model_vocab}; "
                               "pass the tokenizer it was trained with")
    return tok.to_spec()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-consolidate",
        description="Turn a moe_dist DCP checkpoint into one .pt file, a safetensors export or a Hugging Face "
                    "(transformers MixtralForCausalLM) folder, offline on CPU "
                    "(no process group, no DeepSpeed), reading only the model weights with bounded memory.",
        epilog="Exit codes: 0 done, 1 --verify found a difference, 2 a user error.")
    p.add_argument("checkpoint", help="checkpoint_step_<N> folder, checkpoint_latest, or a run folder (its newest)")
    p.add_argument("-o", "--out", help="output .pt file, or folder for safetensors / hf (default: "
                   "CHECKPOINT/../consolidated_step_<N>.pt, .../consolidated_step_<N>/ or .../consolidated_step_<N>_hf/)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the written weights (default fp32)")
    p.add_argument("--format", choices=["pt", "safetensors", "hf"], default="pt", dest="fmt",
                   help="output format; hf: a folder transformers.AutoModelForCausalLM loads (Mixtral)")
    p.add_argument("--max-shard-size", help=f"safetensors / hf shard size, e.g. 500MB (default {DEFAULT_MAX_SHARD})")
    p.add_argument("--read-budget", default="32MB",
                   help="bytes per DCP read; peak memory is about this or the largest tensor (default 32MB)")
    p.add_argument("--verify", action="store_true", help="reload the output and compare every tensor")
    p.add_argument("--no-verify-manifest", action="store_true", help="skip the checkpoint's size/checksum check")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--tokenizer", help="'byte' or a local Hugging Face tokenizer folder to store in the output "
                   "instead of the checkpoint's own (e.g. an old checkpoint whose tokenizer folder is gone)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (BarColumn, DownloadColumn, Progress as Bar, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from ..debug import strict_device_from_env

    a = build_parser().parse_args(argv)
    strict_device_from_env()  # tests: consolidation names every device (see moe_dist.debug)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    bar = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
              TimeRemainingColumn(), console=err, disable=a.quiet, transient=False)

    def progress(desc: str, total: int) -> Advance:
        task = bar.add_task(desc, total=total)
        return lambda n: bar.advance(task, n)

    try:
        with bar:
            res = consolidate(a.checkpoint, a.out, dtype=a.dtype, fmt=a.fmt, max_shard_size=a.max_shard_size,
                              verify=a.verify, verify_manifest=not a.no_verify_manifest, force=a.force,
                              read_budget=a.read_budget, progress=progress, tokenizer=a.tokenizer)
    except (ConsolidateError, CheckpointError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        return 1 if str(e).startswith("verify:") else 2
    rate = res.bytes_read / max(res.seconds, 1e-9) / 1e6
    err.print(f"wrote {escape(str(res.out))} (step {res.step}, {res.tensors} tensors, "
              f"{res.bytes_written / 1e6:,.1f} MB {a.dtype}) in {res.seconds:.2f}s, {rate:,.0f} MB/s read")
    if res.verified is not None:
        err.print(f"verified {res.verified} tensors against {escape(a.checkpoint)}: identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
