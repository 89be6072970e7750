"""An engine's training state <-> ``torch.distributed.checkpoint`` (DCP), in the model's own shapes.

A checkpoint written on N ranks with one sharding loads on M ranks with another, straight from the
shards. Every parameter and optimizer state is one ``ShardedTensor`` of the parameter's shape
(``(out, in)`` for a matrix) whose shards are the boxes (:func:`~.fragment.flat_boxes`) of the
runs the saving ranks owned. DCP matches saved boxes against whatever the loading ranks own, and
any other DCP reader sees ordinary tensors: ``dcp_to_torch_save`` gives a state dict the model
loads as is, and an FSDP2 model loads ``model.*`` with ``set_model_state_dict``.

Keys are parameter names (the names of the consolidated file), under the names
``torch.distributed.checkpoint.state_dict`` uses (``keys``)::

    model.{name}                   fp32 master weights                 ShardedTensor S
    optim.state.{name}.{state}     exp_avg, exp_avg_sq, momentum_buffer ShardedTensor S
    optim.state.{name}.step        the optimizer's step count           float32 0-dim tensor

A tied weight is saved under each of its names (as ``state_dict()`` lists it); it is loaded from
its first name. ``step`` is a plain tensor: DCP treats it as replicated and writes one copy; float32
(as torch's Adam keeps it) counts steps exactly up to 2**24. Parameter groups (learning rates) are
not saved here: the schedule lives in ``train_state.json``.

The engine (:class:`moe_dist.parallel.engine.Engine`) supplies the runs (``checkpoint_fragments``)
and the hooks around a load; nothing here knows which engine it is.

Expert parallelism: a parameter may exist on some ranks only. A ``ShardedTensor``'s metadata must
list every rank's shards, so the runs are all-gathered over the checkpoint group and every rank
builds every key, with no local shard where it owns nothing. The same gather rejects two ranks
claiming the same elements and runs that leave holes.

Why ``ShardedTensor`` (deprecated in torch, hence a FutureWarning from DCP): ZeRO-1/2 runs start
and end anywhere, so one rank's part is several boxes; a DTensor placement describes one box per
rank, ShardedTensor metadata any number.

Use (all ranks)::

    dcp.save(EngineCheckpoint(engine).for_save(), checkpoint_id=path)
    saved = read_saved_keys(path)
    dcp.load(EngineCheckpoint(engine, saved=saved).for_load(), checkpoint_id=path)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from ..logging_utils import warn_once
from .errors import CheckpointError
from .fragment import Fragment, box_start, box_view, flat_boxes
from .keys import MODEL, MODEL_PREFIX, OPTIM, OPTIM_STATE_PREFIX, model_key, optim_key
from .saved_keys import SavedKeys, read_saved_keys  # noqa: F401  (re-exported: the checkpoint metadata lives in saved_keys.py)


# ----------------------------------------------------------------------------- global layout
@dataclass(frozen=True)
class _Span:
    """One rank's run of one key, as all-gathered: flat ``[offset, offset + n)`` of ``shape``."""

    key: str
    offset: int
    n: int
    shape: tuple[int, ...]
    dtype: str
    device: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
        shapes = {sp.shape for _, sp in entries}
        if len(shapes) != 1:
            raise CheckpointError(f"{key}: ranks disagree on the parameter's shape ({sorted(shapes)}); "
                                  "two different parameters carry one name")
        entries.sort(key=lambda e: e[1].offset)
        pos = 0
        for rank, sp in entries:  # runs sorted by offset must tile [0, numel)
            if sp.offset != pos:
                what = "overlaps" if sp.offset < pos else "leaves a gap before"
                raise CheckpointError(f"{key}: rank {rank}'s fragment [{sp.offset}, {sp.offset + sp.n}) {what} "
                                      f"element {pos}; two ranks hold the same name (expert parameters must be "
                                      "named by their global index) or a fragment is missing")
            pos += sp.n
        if pos != entries[0][1].numel:
            raise CheckpointError(f"{key}: fragments cover {pos} of {entries[0][1].numel} elements")
    return layout


def _sharded(entries: list[tuple[int, _Span]], local: list[torch.Tensor]) -> ShardedTensor:
    """A ShardedTensor of the parameter's shape: every rank's boxes in the metadata, ours as
    views of our runs (``local``: this rank's runs, in the order of its entries)."""
    me = dist.get_rank() if dist.is_initialized() else 0
    shape = entries[0][1].shape
    metas, shards = [], []
    mine = iter(local)
    for rank, sp in entries:
        run = next(mine) if rank == me else None
        for box in flat_boxes(shape, sp.offset, sp.n):
            m = ShardMetadata(shard_offsets=list(box.offsets), shard_sizes=list(box.sizes),
                              placement=f"rank:{rank}/{sp.device}")
            metas.append(m)
            if run is not None:
                shards.append(Shard(box_view(run, box, sp.offset), m))
    props = TensorProperties(dtype=getattr(torch, entries[0][1].dtype), layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format,
                             pin_memory=bool(local and local[0].is_pinned()))
    md = ShardedTensorMetadata(shards_metadata=metas, size=torch.Size(shape), tensor_properties=props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, md)


def _build(runs: dict[str, list[tuple[torch.Tensor, int, tuple[int, ...]]]], group: Any,
           local_error: Optional[BaseException] = None) -> dict[str, ShardedTensor]:
    """{key: [(flat [n] run, offset, shape)]} -> {key: ShardedTensor}, one collective for all keys."""
    spans = [_Span(k, off, t.numel(), tuple(shape), str(t.dtype).removeprefix("torch."), str(t.device))
             for k, items in runs.items() for t, off, shape in items]
    layout = _gather_layout(spans, group, local_error)
    out = {}
    for key in sorted(layout):
        me = dist.get_rank() if dist.is_initialized() else 0
        by_offset = {off: t for t, off, _ in runs.get(key, [])}
        out[key] = _sharded(layout[key], [by_offset[sp.offset] for r, sp in layout[key] if r == me])
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.x": a, "optim.state.x.exp_avg": b} -> {"model": {"x": a}, "optim": {"state": {"x": {"exp_avg": b}}}},
    the structure ``get_state_dict`` returns, so ``dcp_to_torch_save`` rebuilds it."""
    out: dict[str, Any] = {MODEL: {}, OPTIM: {"state": {}}}
    for key, v in flat.items():
        if key.startswith(MODEL_PREFIX):
            out[MODEL][key[len(MODEL_PREFIX):]] = v
        else:
            name, state = key[len(OPTIM_STATE_PREFIX):].rsplit(".", 1)
            out[OPTIM]["state"].setdefault(name, {})[state] = v
    return out


def _step_value(v: Any) -> torch.Tensor:
    return torch.tensor(float(v.item() if torch.is_tensor(v) else v), dtype=torch.float32, device="cpu")


# ----------------------------------------------------------------------------- the Stateful pair
class EngineCheckpoint:
    """The engine's checkpointable state as the two ``Stateful`` entries DCP saves and loads:
    ``{"model": ..., "optim": ...}``.

    Save: ``dcp.save(EngineCheckpoint(engine).for_save())``. Load:
    ``dcp.load(EngineCheckpoint(engine, saved=read_saved_keys(path)).for_load())``: the template
    is cut to what the checkpoint holds (a missing model key raises naming it and the path;
    optimizer keys it lacks keep their fresh values, warned once; a checkpoint saved before the
    first step loads weights only), optimizer states the fresh engine lacks are created first, and
    after DCP has filled the views the model weights are refreshed from the masters. Every call is
    collective over ``group`` (the world by default).
    """

    def __init__(self, engine: Any, group: Any = None, saved: Optional[SavedKeys] = None,
                 load_optimizer: bool = True) -> None:
        self.engine, self.group, self.saved, self.load_optimizer = engine, group, saved, load_optimizer
        self._built: Optional[dict[str, Any]] = None
        self._fragments: list[Fragment] = []

    def for_save(self) -> dict[str, Any]:
        """The nested DCP state dict (built now: views of the live tensors, so save before the next step)."""
        return self._build_once(loading=False)

    def for_load(self) -> dict[str, "_Part"]:
        return {MODEL: _Part(self, MODEL), OPTIM: _Part(self, OPTIM)}

    # -- building
    def _build_once(self, loading: bool) -> dict[str, Any]:
        if self._built is None:
            self._built = self._template() if loading else self._state()
        return self._built

    def _state(self) -> dict[str, Any]:
        runs: dict[str, list] = {}
        steps: dict[str, torch.Tensor] = {}
        error: Optional[BaseException] = None
        try:
            for f in self.engine.checkpoint_fragments():
                for name in (f.name, *f.aliases):
                    runs.setdefault(model_key(name), []).append((f.master, f.offset, f.shape))
                for state, t in f.states.items():
                    runs.setdefault(optim_key(f.name, state), []).append((t, f.offset, f.shape))
                for state, whole in f.whole_states.items():  # [N], saved as the owned run only
                    runs.setdefault(optim_key(f.name, state), []).append((whole.narrow(0, f.offset, f.n), f.offset,
                                                                           f.shape))
                for state, v in f.scalars().items():
                    steps[optim_key(f.name, state)] = _step_value(v)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank by _build
            error, runs, steps = e, {}, {}
        return _nest({**_build(runs, self.group, error), **steps})

    def _template(self) -> dict[str, Any]:
        engine, saved = self.engine, self.saved
        runs: dict[str, list] = {}
        plain: dict[str, torch.Tensor] = {}
        skipped: list[str] = []
        error: Optional[BaseException] = None
        try:
            want_optim = self.load_optimizer and (saved is None or saved.has_optimizer_states)
            if want_optim and not engine.has_optimizer_state():
                engine.materialize_optimizer_state()
            self._fragments = engine.checkpoint_fragments()

            def wanted(k: str) -> bool:
                if saved is None or k in saved:
                    return True
                skipped.append(k)
                return False

            for f in self._fragments:
                if saved is not None:
                    saved.require_model(f.name, f.shape)
                runs.setdefault(model_key(f.name), []).append((f.master, f.offset, f.shape))
                if not want_optim:
                    continue
                for state, t in f.states.items():
                    if wanted(optim_key(f.name, state)):
                        runs.setdefault(optim_key(f.name, state), []).append((t, f.offset, f.shape))
                for state, whole in f.whole_states.items():
                    # A plain tensor of the whole shape: DCP assembles it from however many saved boxes.
                    if wanted(optim_key(f.name, state)):
                        plain[optim_key(f.name, state)] = whole.view(f.shape)
                for state, v in f.scalars().items():
                    if wanted(optim_key(f.name, state)):
                        plain[optim_key(f.name, state)] = _step_value(v)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank by _build
            error, runs, plain = e, {}, {}
        if skipped:
            warn_once(f"{saved.path}: {len(skipped)} optimizer entries are not in the checkpoint and keep their "
                      f"fresh (zero) values, e.g. {skipped[:3]}; was it saved with another optimizer?")
        return _nest({**_build(runs, self.group, error), **plain})

    def load_whole(self, state: dict[str, Any]) -> None:
        """Write whole tensors (``{"model": {name: S}, "optim": {"state": {name: {state: S}}}}``, as
        ``dcp_to_torch_save`` gives them) into the engine: each rank copies its own runs. Collective."""
        if self.load_optimizer and state.get(OPTIM) and not self.engine.has_optimizer_state():
            self.engine.materialize_optimizer_state()
        self._fragments = self.engine.checkpoint_fragments()
        self._apply(MODEL, state[MODEL])
        if self.load_optimizer:
            self._apply(OPTIM, state.get(OPTIM, {}))

    # -- applying what DCP loaded
    @torch.no_grad()
    def _apply(self, part: str, loaded: dict[str, Any]) -> None:
        error: Optional[BaseException] = None
        try:
            if part == MODEL:
                for f in self._fragments:
                    _write_run(f.master, f, loaded[f.name], model_key(f.name))
            else:
                _write_optimizer(self._fragments, loaded.get("state", {}))
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
        _raise_if_any(_all_gather(_error_text(error), self.group), error)
        if part == MODEL:
            self.engine.sync_weights_from_masters()  # collective: every rank calls it


class _Part:
    """One top-level entry (``model`` or ``optim``) of an :class:`EngineCheckpoint`, as DCP's
    ``Stateful``: DCP asks for ``state_dict()`` (the template, built once for both entries), fills
    it in place, then hands it back to ``load_state_dict`` (``model`` first: keys are sorted)."""

    def __init__(self, owner: EngineCheckpoint, part: str) -> None:
        self.owner, self.part = owner, part

    def state_dict(self) -> dict[str, Any]:
        return self.owner._build_once(loading=True)[self.part]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.owner._apply(self.part, state_dict)


def _write_run(dst: torch.Tensor, f: Fragment, value: Any, key: str) -> None:
    """Copy the loaded elements ``[f.offset, f.offset + n)`` of ``key`` into the flat ``dst`` [n]
    (nothing to copy when DCP already wrote through the template's views)."""
    if isinstance(value, ShardedTensor):
        covered = 0
        for shard in value.local_shards():
            md = shard.metadata
            start = box_start(f.shape, tuple(md.shard_offsets), tuple(md.shard_sizes))
            n = shard.tensor.numel()
            if f.offset <= start and start + n <= f.offset + f.n:
                _copy(dst.narrow(0, start - f.offset, n), shard.tensor.reshape(-1))
                covered += n
        if covered != f.n:
            raise CheckpointError(f"{key}: the loaded shards cover {covered} of the {f.n} elements "
                                  f"[{f.offset}, {f.offset + f.n}) this rank owns")
    elif torch.is_tensor(value) and tuple(value.shape) == f.shape:
        _copy(dst, value.reshape(-1).narrow(0, f.offset, f.n))
    else:
        raise CheckpointError(f"{key}: expected a ShardedTensor or a tensor of shape {f.shape}, got "
                              f"{type(value).__name__}{tuple(value.shape) if torch.is_tensor(value) else ''}")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.data_ptr() != src.data_ptr() or dst.device != src.device:  # views of the template: already in place
        dst.copy_(src)


def _write_optimizer(fragments: list[Fragment], loaded: dict[str, dict[str, Any]]) -> None:
    steps: dict[tuple[int, str], tuple[dict, str, list[float]]] = {}  # (optimizer entry, state) -> loaded values
    for f in fragments:
        mine = loaded.get(f.name, {})
        for state, t in f.states.items():
            if state in mine:
                _write_run(t, f, mine[state], optim_key(f.name, state))
        for state, whole in f.whole_states.items():
            value = mine.get(state)
            if value is not None:
                if isinstance(value, ShardedTensor) or tuple(value.shape) != f.shape:
                    raise CheckpointError(f"{optim_key(f.name, state)}: expected the whole {f.shape} state")
                _copy(whole, value.reshape(-1))
        for state in f.scalars():
            if state in mine:
                steps.setdefault((id(f.owner), state), (f.owner, state, []))[2].append(float(mine[state]))
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
