"""Read a DCP training checkpoint without a process group, DeepSpeed or pickle's trust.

Used by ``moe-consolidate``, ``load_checkpoint`` / ``load_model_for_inference`` and training
resume. Two things it does that plain ``FileSystemReader`` does not:

* DCP's ``.metadata`` is a pickle. :class:`CheckpointReader` unpickles it with an allow-list
  (DCP's own dataclasses and enums, torch dtypes/sizes, paths), so a crafted file cannot run code.
* :class:`Checkpoint` checks the folder (manifest, train state, config, every model tensor present,
  of the right size and covered exactly once by its chunks) and streams the model tensors in
  bounded batches: peak memory is one batch, not the model.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ..config import ModelConfig
from . import layout
from .errors import CheckpointError
from .fragment import box_start
from .keys import MODEL_PREFIX, model_key
from .manifest import verify_manifest
from .train_state import read_train_state, run_config  # noqa: F401 - their home is train_state.py

DEFAULT_READ_BUDGET = 32 << 20  # bytes read per dcp.load when streaming tensors
Advance = Callable[[int], None]  # called with the bytes just read


def chunks_tile(meta: TensorStorageMetadata) -> tuple[bool, str]:
    """The saved chunks of a tensor must cover it exactly once: no gap, no overlap.

    Chunks that are contiguous runs of the row-major tensor (all ours, and FSDP2's row shards) are
    checked as flat intervals; any other layout by volume and pairwise disjointness."""
    shape = tuple(meta.size)
    numel = math.prod(shape)
    try:
        spans = sorted((box_start(shape, tuple(c.offsets), tuple(c.sizes)),
                        box_start(shape, tuple(c.offsets), tuple(c.sizes)) + math.prod(c.sizes)) for c in meta.chunks)
    except ValueError:
        return _boxes_tile(meta, numel)
    pos = 0
    for start, end in spans:
        if start != pos:
            return False, f"{'gap' if start > pos else 'overlap'} at element {min(start, pos)}"
        pos = end
    return pos == numel, f"covers {pos} of {numel} elements"


def _boxes_tile(meta: TensorStorageMetadata, numel: int) -> tuple[bool, str]:
    chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks]
    total = sum(math.prod(s) for _, s in chunks)
    if total != numel:
        return False, f"chunks hold {total} of {numel} elements"
    for i, (oa, sa) in enumerate(chunks):
        for ob, sb in chunks[i + 1:]:
            if all(a < b + m and b < a + n for a, n, b, m in zip(oa, sa, ob, sb)):
                return False, f"chunks at {list(oa)} and {list(ob)} overlap"
    return True, ""


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` without running code: only DCP's own classes, torch
    dtypes/layouts/sizes and paths may be named (a crafted file cannot call anything else)."""

    _TORCH = {"Size", "_get_layout"}
    _OTHER = {*((m, c) for m in ("pathlib", "pathlib._local") for c in ("PosixPath", "WindowsPath", "PurePosixPath")),
              ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            obj = super().find_class(module, name)  # imports torch's own module, nothing else
            if isinstance(obj, type) and obj.__module__ == module and (
                    dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        elif module in ("torch", "torch.serialization"):
            obj = getattr(torch if module == "torch" else torch.serialization, name, None)
            if name in self._TORCH or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif (module, name) in self._OTHER:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


class CheckpointReader(FileSystemReader):
    """FileSystemReader that reads ``.metadata`` once, through :class:`_SafeUnpickler`, and each
    saved block once per load (:meth:`read_data`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._metadata: Optional[Metadata] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            path = Path(self.path) / layout.DCP_METADATA
            try:
                with open(path, "rb") as f:
                    md = _SafeUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
                raise CheckpointError(f"{path}: unreadable DCP metadata ({e})") from None
            if not isinstance(md, Metadata):
                raise CheckpointError(f"{path}: not DCP metadata (found {type(md).__name__})")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            self._metadata = md
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read this rank's pieces, unpickling every saved block once.

        torch's reader unpickles a block again for each piece taken from it. A rank that owns a
        run of a matrix holds up to three boxes of it (partial row, rows, partial row), often cut
        from one saved block: measured on 3 ranks, loads took 1.65-2.1x the time of a flat layout
        that way, and 1.06x with one read per block (``benchmarks/bench_nd_layout.py``). Pieces
        with storage transforms and non-tensor items go through torch's reader unchanged."""
        mine: dict[str, dict[int, list[ReadItem]]] = {}  # file -> block offset -> pieces
        other: list[ReadItem] = []
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if item.type == LoadItemType.BYTE_IO or info.transform_descriptors:
                other.append(item)
            else:
                mine.setdefault(info.relative_path, {}).setdefault(info.offset, []).append(item)
        for relative_path, blocks in sorted(mine.items()):
            with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                for _, items in sorted(blocks.items()):
                    block = torch.load(self._slice_file(stream, self.storage_data[items[0].storage_index]),
                                       map_location="cpu", weights_only=True)
                    for item in items:
                        piece = narrow_tensor_by_index(block, item.storage_offsets, item.lengths)
                        target = planner.resolve_tensor(item).detach()
                        if target.size() != piece.size():
                            raise CheckpointError(f"{Path(self.path) / relative_path}: a saved piece of "
                                                  f"{item.dest_index.fqn} has size {list(piece.size())}, the load "
                                                  f"expects {list(target.size())}")
                        target.copy_(piece)
                        planner.commit_tensor(item, target)
        if other:
            return super().read_data(dataclasses.replace(plan, items=other), planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done


@dataclass(frozen=True)
class TensorSpec:
    """One ``state_dict`` entry: its shape, the DCP key holding it and, for a tied alias, the
    entry whose storage it shares (the checkpoint stores a tied weight once)."""

    name: str
    shape: tuple[int, ...]
    source: str
    alias_of: Optional[str] = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelLayout:
    specs: list[TensorSpec]      # state_dict order
    sd_metadata: Any  # the state_dict's ``_metadata`` (module versions, an OrderedDict), kept for the .pt

    @property
    def stored(self) -> list[TensorSpec]:
        """Specs that own their storage (aliases excluded), in order."""
        return [s for s in self.specs if s.alias_of is None]


def model_layout(cfg: ModelConfig) -> ModelLayout:
    """Names and shapes of the model's ``state_dict()``, from a meta-device model (no memory)."""
    from .. import model as lm

    model = lm.build(cfg, device="meta")
    param_name = {id(p): n for n, p in model.named_parameters()}  # deduplicated: a tied weight once
    sd = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    specs = []
    for name, t in sd.items():
        owner = first.setdefault(id(t), name)
        specs.append(TensorSpec(name, tuple(t.shape), model_key(param_name.get(id(t), name)),
                                None if owner == name else owner))
    return ModelLayout(specs, getattr(sd, "_metadata", None))


class Checkpoint:
    """A verified DCP checkpoint folder whose model tensors can be read in bounded batches."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.folder = layout.resolve_checkpoint(path)
        if verify:
            verify_manifest(self.folder)
        self.state = read_train_state(self.folder)
        self.step = int(self.state["step"])
        self.config = run_config(self.state["config"], self.folder / layout.TRAIN_STATE)
        self.layout = model_layout(self.config.model)
        self.reader = CheckpointReader(self.folder)
        self.metadata = self.reader.read_metadata().state_dict_metadata
        self._check_keys()

    def _check_keys(self) -> None:
        want = {s.source: s for s in self.layout.stored}
        aliases = {MODEL_PREFIX + s.name for s in self.layout.specs if s.alias_of is not None}  # a tied head, saved twice
        missing = [k for k in want if k not in self.metadata]
        extra = sorted(k for k in self.metadata if k.startswith(MODEL_PREFIX) and k not in want and k not in aliases)
        for what, keys in (("lacks", missing), ("has unexpected", extra)):
            if keys:
                raise CheckpointError(f"{self.folder}: checkpoint {what} model tensors for its stored config: "
                                      f"{', '.join(keys[:5])}{' …' if len(keys) > 5 else ''} "
                                      "(written by another moe_dist version or architecture?)")
        for key, spec in want.items():
            md = self.metadata[key]
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"{self.folder}: {key} is not a tensor in the DCP metadata")
            if tuple(md.size) != spec.shape:
                raise CheckpointError(f"{self.folder}: {key} has shape {list(md.size)}, the model's "
                                      f"{spec.name} is {list(spec.shape)}")
            ok, why = chunks_tile(md)
            if not ok:
                raise CheckpointError(f"{self.folder}: {key} is not covered exactly once by its chunks ({why})")

    def stored_dtype(self, spec: TensorSpec) -> torch.dtype:
        return self.metadata[spec.source].properties.dtype

    def load(self, dests: dict[str, torch.Tensor]) -> None:
        """One ``dcp.load`` of DCP keys into destinations of their stored shape (any device or dtype:
        e.g. views of a model's parameters); DCP reads just the chunks and byte ranges they need."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(dests, storage_reader=self.reader, no_dist=True)

    def iter_tensors(self, specs: list[TensorSpec], budget: int = DEFAULT_READ_BUDGET,
                     progress: Optional[Advance] = None) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """(spec, tensor shaped like the parameter, in the stored dtype), in order, read ``budget``
        bytes (or one larger tensor) per ``dcp.load``.

        Every tensor is a view into one buffer reused from batch to batch: it is valid until the
        next one is requested (clone it to keep it). So memory is one buffer, whatever the
        consumer and malloc do, and no page is faulted in twice."""
        batches: list[list[tuple[TensorSpec, int, int]]] = [[]]  # (spec, byte offset, nbytes)
        size = 0
        for spec in specs:
            nbytes = spec.numel * self.stored_dtype(spec).itemsize
            if batches[-1] and size + nbytes > budget:
                batches.append([])
                size = 0
            batches[-1].append((spec, size, nbytes))
            size += -(-nbytes // 64) * 64  # keep every view 64-byte aligned
        buf_U8 = torch.empty(max((o + n for b in batches for _, o, n in b), default=0), dtype=torch.uint8,
                             device="cpu")
        for batch in batches:
            dests = {s.source: buf_U8[o:o + n].view(self.stored_dtype(s)).view(self.metadata[s.source].size)
                     for s, o, n in batch}
            self.load(dests)
            for s, _, n in batch:
                if progress:
                    progress(n)
                yield s, dests[s.source].view(s.shape)
