"""Finiteness of what a checkpoint holds: a NaN or inf weight or optimizer state is never published,
never resumed by ``--resume auto``, and refused by ``moe-ckpt verify``.

Three places look: a save scans this rank's fragments (fp32 masters, optimizer states) before it
writes, on the device, one read-back per save (``benchmarks`` figure in the README); a resume scans
what it just loaded the same way; ``moe-ckpt verify`` reads every tensor of the folder offline. The
manifest records that the save-time scan passed (``"finite": true``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import CheckpointError
from .fragment import Fragment

MANIFEST_FIELD = "finite"
SCAN_BUDGET = 64 << 20  # bytes read per dcp.load by scan_folder


def _tensors(f: Fragment) -> list[tuple[str, torch.Tensor]]:
    return [(f.name, f.master), *((f"{f.name} ({k})", t) for k, t in f.states.items()),
            *((f"{f.name} ({k})", t) for k, t in f.whole_states.items())]


def first_nonfinite_local(fragments: list[Fragment]) -> Optional[str]:
    """The name of this rank's first fragment tensor holding a NaN or inf, or None (one host read).

    Screened by each tensor's sum, which a NaN or inf makes non-finite: a reduction that reads memory
    once (measured here: 30 GB/s against 0.2 GB/s for ``isfinite(t).all()``, which writes a mask first);
    a sum that overflowed from huge finite values is then checked element by element."""
    named = [(n, t) for f in fragments for n, t in _tensors(f) if t.numel() and t.is_floating_point()]
    if not named:
        return None
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    ok = torch.ones(len(named), dtype=torch.bool, device="cpu")
    for device, idx in by_device.items():  # one read-back per device (offloaded states live on the host)
        ok[idx] = torch.stack([torch.isfinite(named[i][1].sum()) for i in idx]).to("cpu")
    for i in (~ok).nonzero().flatten().tolist():  # a NaN or inf makes the sum one; so may huge finite values
        if not bool(torch.isfinite(named[i][1]).all()):
            return named[i][0]
    return None


def first_nonfinite(fragments: list[Fragment], group: Any = None) -> Optional[str]:  # noqa: ANN401
    """``first_nonfinite_local`` agreed over ``group`` (a gloo group; collective): 'NAME on rank R' or None."""
    local = first_nonfinite_local(fragments)
    if group is None or not dist.is_initialized():
        return local
    found: list[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, local, group=group)
    return next((f"{name} on rank {r}" for r, name in enumerate(found) if name is not None), None)


def check_manifest_finite(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest that records a failed finiteness scan."""
    if manifest.get(MANIFEST_FIELD) is False:
        raise CheckpointError(f"{folder}: its manifest records non-finite values (NaN or inf); "
                              "resume from another checkpoint")


def scan_folder(folder: Path, budget: int = SCAN_BUDGET) -> None:
    """Read every floating-point tensor of a checkpoint folder (offline, about ``budget`` bytes at a time)
    and raise CheckpointError at the first one holding a NaN or inf."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .reader import CheckpointReader

    reader = CheckpointReader(folder)
    metadata = reader.read_metadata().state_dict_metadata
    keys = [k for k, md in sorted(metadata.items())
            if isinstance(md, TensorStorageMetadata) and md.properties.dtype.is_floating_point]
    batches: list[list[str]] = [[]]
    size = 0
    for k in keys:
        md = metadata[k]
        nbytes = md.size.numel() * md.properties.dtype.itemsize
        if batches[-1] and size + nbytes > budget:
            batches.append([])
            size = 0
        batches[-1].append(k)
        size += nbytes
    for batch in batches:
        dests = {k: torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype, device="cpu") for k in batch}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(dests, storage_reader=reader, no_dist=True)
        for k, t in dests.items():
            bad = 0 if bool(torch.isfinite(t.sum())) else int((~torch.isfinite(t)).sum())  # the sum: a fast screen
            if bad:
                raise CheckpointError(f"{folder}: tensor {k} holds {bad} non-finite value(s) (NaN or inf) of "
                                      f"{t.numel()}; the run had diverged when it was saved: use an earlier "
                                      "checkpoint")
