"""DeepSpeed ZeRO training state <-> ``torch.distributed.checkpoint`` (DCP), resharded on load.

A checkpoint written on N ranks with ZeRO stage a loads on M ranks with stage b, straight from
the shards: every parameter is stored flattened, as a 1-D ``ShardedTensor`` of global shape
``[numel]`` whose shards are exactly the fragments the saving ranks owned (``zero_fragments``
finds them). DCP matches saved chunks against whatever fragments the loading ranks own.

Keys (``key = key_fn(name)``; names, never optimizer indices, so groups may differ on load)::

    model.{key}                  fp32 master weights                       ShardedTensor [numel]
    optim.{state}.{key}          each tensor state (exp_avg, exp_avg_sq,   ShardedTensor [numel]
                                 momentum_buffer, ...), master's layout
    optim_scalar.{state}.{key}   scalar state (Adam's step) of the param's  float64 0-dim tensor
                                 flat group

Scalars are plain tensors: DCP treats them as replicated, writes one copy (every rank owning a
fragment holds the same value, since a flat group steps as one) and hands every loading rank
the value. float64 keeps any step count below 2**53 exact; on load it is converted back to the
type the optimizer keeps (int for DeepSpeed's Adam, a tensor for torch's).

Expert parallelism: a parameter may exist on some ranks only (experts live on their EP ranks,
under a global name). A ``ShardedTensor``'s metadata must list every rank's shards, so the
(key, offset, numel) layout is all-gathered over the world group and every rank builds every key,
with no local shard where it owns nothing. The same gather rejects keys two ranks claim for the
same elements (a ``key_fn`` that is not globally unique) and fragments that leave holes.

Why ``ShardedTensor`` (which torch marks deprecated, hence a FutureWarning from DCP): ZeRO-1/2
fragments start and end anywhere, and a DTensor ``Shard(0)`` placement only describes the even
``torch.chunk`` split; ShardedTensor metadata takes arbitrary 1-D offsets and DCP reshards it.

``group``: the process group of the layout all-gather (default: the world). Pass the gloo group
DCP itself uses when the default group is NCCL.

Use (all ranks)::

    dcp.save(zero_state_dict(engine), checkpoint_id=path)
    sd = zero_load_template(engine, checkpoint_path=path)   # materialises optimizer states
    dcp.load(sd, checkpoint_id=path)
    load_zero_state_dict(engine, sd)                        # masters, states, model weights
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from ..logging_utils import warn_once
from .errors import CheckpointError
from .zero_fragments import (Fragment, has_optimizer_states, local_fragments, materialize_optimizer_states,
                             sync_model_weights)

KeyFn = Callable[[str], str]
MODEL, OPTIM, SCALAR = "model.", "optim.", "optim_scalar."
_key_fns: "weakref.WeakKeyDictionary[Any, KeyFn]" = weakref.WeakKeyDictionary()


def _identity(name: str) -> str:
    return name


def model_key(key: str) -> str:
    return f"{MODEL}{key}"


def optim_key(state: str, key: str) -> str:
    return f"{OPTIM}{state}.{key}"


def scalar_key(state: str, key: str) -> str:
    return f"{SCALAR}{state}.{key}"


# ----------------------------------------------------------------------------- checkpoint metadata
@dataclass(frozen=True)
class SavedKeys:
    """What a DCP checkpoint holds, from its ``.metadata`` alone (no tensor is read)."""

    path: str
    sizes: dict[str, Optional[tuple[int, ...]]]  # key -> global size; None for non-tensor entries

    def __contains__(self, key: str) -> bool:
        return key in self.sizes

    @property
    def has_optimizer_states(self) -> bool:
        return any(k.startswith(OPTIM) for k in self.sizes)

    def require_model(self, key: str, numel: int) -> None:
        """Raise :class:`CheckpointError` unless ``model.{key}`` is saved with ``numel`` elements."""
        mk = model_key(key)
        if mk not in self.sizes:
            raise CheckpointError(f"{self.path}: the checkpoint has no weights for parameter '{key}' (key {mk!r}); "
                                  "the model differs from the one saved, or key_fn maps names differently")
        size = self.sizes[mk]
        if size is None or _prod(size) != numel:
            raise CheckpointError(f"{self.path}: {mk!r} has shape {size} in the checkpoint but the parameter has "
                                  f"{numel} elements; the architecture differs from the one saved")


def _prod(size: tuple[int, ...]) -> int:
    out = 1
    for s in size:
        out *= s
    return out


def read_saved_keys(path: str, reader: Any = None) -> SavedKeys:
    """Keys and global sizes of a DCP checkpoint folder, from its ``.metadata`` (read without
    trusting pickle: :class:`~moe_dist.checkpoint.reader.CheckpointReader`).

    ``reader``: a ``CheckpointReader`` of ``path`` that the caller then hands to ``dcp.load``; it
    keeps the parsed metadata, so a resume unpickles ``.metadata`` once, not twice."""
    from pathlib import Path

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .reader import CheckpointReader

    try:
        md = (reader or CheckpointReader(Path(path))).read_metadata()
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read the DCP metadata ({e.__class__.__name__}: {e}); "
                              "is this a complete checkpoint folder?") from e
    sizes = {k: tuple(m.size) if isinstance(m, TensorStorageMetadata) else None
             for k, m in md.state_dict_metadata.items()}
    return SavedKeys(str(path), sizes)


# ----------------------------------------------------------------------------- global layout
@dataclass(frozen=True)
class _Span:
    key: str
    offset: int      # first element inside the flattened [numel] parameter
    n: int           # elements owned
    numel: int       # global numel of the parameter
    dtype: str
    device: str


def _error_text(e: Optional[BaseException]) -> Optional[str]:
    if e is None:
        return None
    return str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"


def _all_gather(obj: Any, group: Any) -> list[tuple[int, Any]]:
    """[(global rank, obj of that rank)] over ``group`` (the world by default)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [(0, obj)]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(gathered)))
    return list(zip(ranks, gathered))


def _raise_if_any(per_rank_errors: list[tuple[int, Optional[str]]], local: Optional[BaseException]) -> None:
    """Raise on every rank if any rank failed: a rank that raised alone would leave the others
    waiting forever in the next collective."""
    errors = [f"rank {r}: {err}" for r, err in per_rank_errors if err]
    if errors:
        raise CheckpointError("; ".join(errors)) from local


def _gather_layout(spans: list[_Span], group: Any, local_error: Optional[BaseException]
                   ) -> dict[str, list[tuple[int, _Span]]]:
    """key -> [(global rank, span)] over all ranks, checked to tile [0, numel) exactly."""
    gathered = _all_gather((spans, _error_text(local_error)), group)
    _raise_if_any([(r, err) for r, (_, err) in gathered], local_error)
    layout: dict[str, list[tuple[int, _Span]]] = {}
    for rank, (rank_spans, _) in gathered:
        for sp in rank_spans:
            layout.setdefault(sp.key, []).append((rank, sp))
    for key, entries in layout.items():
        numels = {sp.numel for _, sp in entries}
        if len(numels) != 1:
            raise CheckpointError(f"{key}: ranks disagree on the parameter size ({sorted(numels)} elements); "
                                  "key_fn must map different parameters to different keys")
        entries.sort(key=lambda e: e[1].offset)
        pos = 0
        for rank, sp in entries:  # shards sorted by offset must tile [0, numel)
            if sp.offset != pos:
                what = "overlaps" if sp.offset < pos else "leaves a gap before"
                raise CheckpointError(f"{key}: rank {rank}'s fragment [{sp.offset}, {sp.offset + sp.n}) {what} "
                                      f"element {pos}; two ranks hold the same key (make key_fn globally unique, "
                                      "e.g. global expert indices) or a fragment is missing")
            pos += sp.n
        if pos != numels.pop():
            raise CheckpointError(f"{key}: fragments cover {pos} of {entries[0][1].numel} elements")
    return layout


def _sharded(key: str, entries: list[tuple[int, _Span]], local: Optional[torch.Tensor]) -> ShardedTensor:
    """A 1-D ShardedTensor [numel] whose metadata lists every rank's shard and holds ours (if any)."""
    metas = [ShardMetadata(shard_offsets=[sp.offset], shard_sizes=[sp.n], placement=f"rank:{rank}/{sp.device}")
             for rank, sp in entries]
    me = dist.get_rank() if dist.is_initialized() else 0
    shards = [Shard(local, m) for (rank, _), m in zip(entries, metas) if rank == me]
    dtype = getattr(torch, entries[0][1].dtype)
    props = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format,
                             pin_memory=bool(local is not None and local.is_pinned()))
    md = ShardedTensorMetadata(shards_metadata=metas, size=torch.Size([entries[0][1].numel]), tensor_properties=props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, md)


def _build(tensors: dict[str, tuple[torch.Tensor, int, int]], group: Any,
           local_error: Optional[BaseException] = None) -> dict[str, Any]:
    """{key: (local [n] tensor, offset, numel)} -> {key: ShardedTensor}, one collective for all keys."""
    spans = [_Span(k, off, t.numel(), numel, str(t.dtype).removeprefix("torch."), str(t.device))
             for k, (t, off, numel) in tensors.items()]
    layout = _gather_layout(spans, group, local_error)
    return {k: _sharded(k, layout[k], tensors[k][0] if k in tensors else None) for k in sorted(layout)}


def _claim(owners: dict[str, str], key: str, name: str) -> str:
    """Record that ``name`` is saved under ``key``; two parameters of one rank may not share a key."""
    if owners.setdefault(key, name) != name:
        raise CheckpointError(f"key_fn maps parameters '{owners[key]}' and '{name}' to the same key '{key}'")
    return key


def _scalar_value(v: Any) -> torch.Tensor:
    return torch.tensor(float(v.item() if torch.is_tensor(v) else v), dtype=torch.float64, device="cpu")


# ----------------------------------------------------------------------------- save
def zero_state_dict(engine: Any, key_fn: KeyFn = _identity, *, group: Any = None) -> dict[str, Any]:
    """This rank's fp32 masters and optimizer states as a DCP state dict (collective: all ranks call).

    The values are views of the live optimizer tensors (DCP copies what it writes), so save
    before the next step changes them.
    """
    tensors: dict[str, tuple[torch.Tensor, int, int]] = {}
    scalars: dict[str, torch.Tensor] = {}
    error: Optional[BaseException] = None
    owners: dict[str, str] = {}
    try:
        for f in local_fragments(engine):
            key = _claim(owners, key_fn(f.name), f.name)
            tensors[model_key(key)] = (f.master, f.offset, f.numel)
            for state, t in f.states.items():
                tensors[optim_key(state, key)] = (t, f.offset, f.numel)
            for state, whole in f.whole_states.items():  # [N], saved as the owned span only
                tensors[optim_key(state, key)] = (whole.narrow(0, f.offset, f.n), f.offset, f.numel)
            for state, v in f.scalars().items():
                scalars[scalar_key(state, key)] = _scalar_value(v)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank by _build
        error, tensors = e, {}
    out = _build(tensors, group, error)
    out.update(scalars)
    return out


# ----------------------------------------------------------------------------- load
def zero_load_template(engine: Any, key_fn: KeyFn = _identity, checkpoint_path: Optional[str] = None, *,
                       load_optimizer: bool = True, group: Any = None, reader: Any = None) -> dict[str, Any]:
    """The state dict ``dcp.load`` fills in place: this rank's destination fragments, same keys.

    With ``checkpoint_path`` the template is cut to what the checkpoint holds: a missing model
    key raises :class:`CheckpointError` naming it and the path; optimizer keys the checkpoint
    lacks are skipped (warned once), and a checkpoint without any (saved before the first step)
    loads weights only. Optimizer states the fresh engine lacks are materialised first (see
    ``materialize_optimizer_states``). ``reader``: see :func:`read_saved_keys`. Collective: all
    ranks call it.
    """
    _key_fns[engine] = key_fn
    tensors: dict[str, tuple[torch.Tensor, int, int]] = {}
    out: dict[str, Any] = {}
    skipped: list[str] = []
    error: Optional[BaseException] = None
    try:
        saved = read_saved_keys(checkpoint_path, reader) if checkpoint_path is not None else None
        want_optim = load_optimizer and (saved is None or saved.has_optimizer_states)
        if want_optim and not has_optimizer_states(engine):
            materialize_optimizer_states(engine)

        def wanted(k: str) -> bool:
            if saved is None or k in saved:
                return True
            skipped.append(k)
            return False

        owners: dict[str, str] = {}
        for f in local_fragments(engine):
            key = _claim(owners, key_fn(f.name), f.name)
            if saved is not None:
                saved.require_model(key, f.numel)
            tensors[model_key(key)] = (f.master, f.offset, f.numel)
            if not want_optim:
                continue
            for state, t in f.states.items():
                if wanted(optim_key(state, key)):
                    tensors[optim_key(state, key)] = (t, f.offset, f.numel)
            for state, whole in f.whole_states.items():
                # A plain [N] tensor: DCP assembles the whole param from however many saved shards.
                if wanted(optim_key(state, key)):
                    out[optim_key(state, key)] = whole
            for state, v in f.scalars().items():
                if wanted(scalar_key(state, key)):
                    out[scalar_key(state, key)] = _scalar_value(v)
    except Exception as e:  # noqa: BLE001 - re-raised on every rank by _build
        error, tensors, out = e, {}, {}
    if skipped:
        warn_once(f"{checkpoint_path}: {len(skipped)} optimizer entries are not in the checkpoint and keep their "
                  f"fresh (zero) values, e.g. {skipped[:3]}; was it saved with another optimizer?")
    out.update(_build(tensors, group, error))
    return out


def _local_values(value: Any, f: Fragment, key: str) -> torch.Tensor:
    """The [n] elements [f.offset, f.offset + n) of a loaded value (ShardedTensor shard or whole tensor)."""
    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            off, size = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
            if off <= f.offset and f.offset + f.n <= off + size:
                return shard.tensor.narrow(0, f.offset - off, f.n)
        raise CheckpointError(f"{key}: the state dict holds no local shard covering elements "
                              f"[{f.offset}, {f.offset + f.n}); was it built by zero_load_template for this engine?")
    if torch.is_tensor(value) and value.numel() == f.numel:
        return value.reshape(-1).narrow(0, f.offset, f.n)
    raise CheckpointError(f"{key}: expected a ShardedTensor or a tensor of {f.numel} elements, got "
                          f"{type(value).__name__}{tuple(value.shape) if torch.is_tensor(value) else ''}")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.data_ptr() != src.data_ptr() or dst.device != src.device:  # a template of live views is already in place
        dst.copy_(src)


@torch.no_grad()
def load_zero_state_dict(engine: Any, state_dict: dict[str, Any], key_fn: Optional[KeyFn] = None, *,
                         group: Any = None) -> None:
    """Write loaded fragments into the fp32 masters and optimizer states, then refresh model weights.

    ``key_fn`` defaults to the one given to ``zero_load_template`` for this engine. Keys other
    than ``model.``/``optim.``/``optim_scalar.`` are ignored; absent optimizer keys are left as
    they are; an absent model key is an error. Collective (model weights are re-gathered).
    """
    key_fn = key_fn or _key_fns.get(engine, _identity)
    error: Optional[BaseException] = None
    try:
        _write_fragments(engine, state_dict, key_fn)
    except Exception as e:  # noqa: BLE001 - raised on every rank below
        error = e
    _raise_if_any(_all_gather(_error_text(error), group), error)
    sync_model_weights(engine)


def _write_fragments(engine: Any, state_dict: dict[str, Any], key_fn: KeyFn) -> None:
    steps: dict[tuple[int, str], tuple[dict, str, list[float]]] = {}  # (flat group, state) -> loaded values
    for f in local_fragments(engine):
        key = key_fn(f.name)
        mk = model_key(key)
        if mk not in state_dict:
            raise CheckpointError(f"{mk}: missing from the loaded state dict; build it with zero_load_template")
        _copy(f.master, _local_values(state_dict[mk], f, mk))
        for state, t in f.states.items():
            if optim_key(state, key) in state_dict:
                _copy(t, _local_values(state_dict[optim_key(state, key)], f, optim_key(state, key)))
        for state, whole in f.whole_states.items():
            value = state_dict.get(optim_key(state, key))
            if value is not None:
                if not torch.is_tensor(value) or isinstance(value, ShardedTensor) or value.numel() != f.numel:
                    raise CheckpointError(f"{optim_key(state, key)}: expected the whole [{f.numel}] state")
                _copy(whole, value.reshape(-1))
        for state in f.scalars():
            value = state_dict.get(scalar_key(state, key))
            if value is not None:
                steps.setdefault((id(f.owner), state), (f.owner, state, []))[2].append(float(value))
    for owner, state, values in steps.values():
        if len(set(values)) > 1:
            warn_once(f"optimizer scalar '{state}' differs between params of one flat group {sorted(set(values))}; "
                      "using the largest")
        _set_scalar(owner, state, max(values))


def _set_scalar(owner: dict, state: str, value: float) -> None:
    current = owner[state]
    if torch.is_tensor(current):
        current.fill_(value)
    else:
        owner[state] = type(current)(value)
