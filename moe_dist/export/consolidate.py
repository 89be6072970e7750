"""Offline consolidation: a DCP training checkpoint -> one ``.pt`` file or a safetensors export.

::

    moe-consolidate runs/x/checkpoints/checkpoint_latest          # -> runs/x/checkpoints/consolidated_step_<N>.pt
    moe-consolidate CKPT -o model.pt --dtype bf16 --verify
    moe-consolidate CKPT --format safetensors --max-shard-size 2GB -o export/   # Hugging Face layout
    moe-consolidate CKPT --format hf -o hf_model/     # transformers' MixtralForCausalLM (see export/hf.py)

One process, CPU only: no process group, no DeepSpeed. Only the ``model.*`` keys are read
(optimizer states and RNG are never touched), a few tensors at a time: each batch (at most
``--read-budget`` bytes, or one tensor) is one ``dcp.load`` into preallocated 1-D destinations,
which reads just their byte ranges and assembles the chunks every ZeRO / expert-parallel rank
wrote. Peak memory is therefore about one batch (or the largest tensor), not the model.
The writers: ``export/pt_writer.py`` (the ``.pt``, streamed), ``export/safetensors_writer.py`` and
``export/hf.py``; the command line: ``export/consolidate_cli.py``.

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
  ``transformers.AutoModelForCausalLM.from_pretrained`` (``export/hf.py``).

The tokenizer travels with every output: its spec (a Hugging Face tokenizer's with its files embedded)
sits in the ``.pt`` and in ``moe_dist_config.json``; ``--format hf`` writes the tokenizer files.

Exit codes: 0 done, 1 ``--verify`` found a difference, 2 a user error (one line, no traceback).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..checkpoint import layout
from ..checkpoint.reader import DEFAULT_READ_BUDGET, Advance, Checkpoint, read_train_state
from ..config import ConfigError
from .errors import ConsolidateError
from .hf import check_exportable, is_hf_export, tensor_renamer, write_hf
from .pt_writer import write_pt
from .safetensors_writer import MOE_CONFIG, safetensors_files, write_safetensors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SHARD = "2GB"


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

        rename = tensor_renamer(ckpt.config.model) if fmt == "hf" else (lambda name: name)
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
        budget = read_budget if isinstance(read_budget, int) else parse_bytes(read_budget, "--read-budget")
        max_shard = parse_bytes(str(max_shard_size or DEFAULT_MAX_SHARD), "--max-shard-size")
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
            written = write_pt(ckpt, tmp, torch_dtype, budget, bar)
            os.replace(tmp, out_path)
        else:
            if fmt == "hf":
                written = write_hf(ckpt, tmp_dir, torch_dtype, max_shard, budget, bar)
            else:
                written = write_safetensors(ckpt, tmp_dir, torch_dtype, max_shard, budget, bar)
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
