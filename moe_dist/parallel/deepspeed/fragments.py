"""Where this rank's share of every parameter lives inside a DeepSpeed ZeRO optimizer.

The checkpoint speaks one language (:class:`~moe_dist.checkpoint.fragment.Fragment`): parameter
``name`` of shape S, flattened, of which this rank owns the elements ``[offset, offset + n)``. This
module translates DeepSpeed's internal optimizer layouts into that language and back.

ZeRO-1/2 (``DeepSpeedZeroOptimizer``): each param group is flattened (with alignment padding
between params), cut into dp-size equal partitions, and partition ``r`` is cloned into the fp32
master ``single_partition_of_fp32_groups[g]`` (``[partition_size]``). A parameter may straddle a
partition boundary, so a rank owns an arbitrary contiguous fragment of it, described by
``param._hp_mapping`` (``lp_fragment_address``: where in the flattened param;
``hp_fragment_address``: where in the flat master). Optimizer states are keyed by the flat
master and have its shape, except DeepSpeed's Muon momentum (see :class:`Fragment`).

ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is split evenly over its partition
group, ``part = ceil(numel / dp)``, the group's rank ``r`` owning ``[r * part, (r + 1) * part)``
padded past ``numel``; sub-group ``s`` concatenates its params' parts into
``fp32_partitioned_groups_flat[s]`` and ``grad_position[param_id] = (s, start in that flat, part)``.
The partition group is the data-parallel group, except for expert params under EP: their
expert-data-parallel group (``ds_process_group``; ``dp = world / ep``), so ``r`` is the rank in
that group and the ``dp`` ranks holding one expert tile it exactly.

Legend: n fragment elements on this rank, P flat master partition length, N numel of a param.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ...checkpoint.fragment import Fragment, is_scalar

MUON_MOMENTUM = "momentum_buffer"


def zero_stage(engine: Any) -> int:
    """The ZeRO stage of ``engine``; raises for engines whose optimizer this module cannot read."""
    stage = int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0
    opt = getattr(engine, "optimizer", None)
    if stage in (1, 2) and hasattr(opt, "single_partition_of_fp32_groups"):
        return stage
    if stage == 3 and hasattr(opt, "fp32_partitioned_groups_flat"):
        if getattr(opt, "swap_optimizer", False):
            raise NotImplementedError("ZeRO-3 with NVMe optimizer swapping is not supported by the DCP checkpoint: "
                                      "the optimizer states are not resident; use offload_optimizer.device=cpu")
        return stage
    raise TypeError(f"expected a DeepSpeed engine with a ZeRO-1/2/3 optimizer, got ZeRO stage {stage} with "
                    f"{type(opt).__name__}; set zero_optimization.stage to 1, 2 or 3")


def trainable_names(engine: Any) -> dict[int, tuple[str, ...]]:
    """id(param) -> (name, other names) for every trainable parameter of ``engine.module``; a tied
    weight has one entry: its first name, then its aliases (a tied output head)."""
    names: dict[int, tuple[str, ...]] = {}
    for name, p in engine.module.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names[id(p)] = names.get(id(p), ()) + (name,)
    return names


def master_flats(engine: Any) -> list[torch.Tensor]:
    """The flat fp32 master tensors that key ``optimizer.state``: one per group (1/2) or sub-group (3)."""
    opt = engine.optimizer
    if zero_stage(engine) == 3:
        return list(opt.fp32_partitioned_groups_flat)
    return list(opt.single_partition_of_fp32_groups)


def _muon_whole_layout(opt: Any, g: int) -> bool:
    """ZeRO-1/2 group ``g`` keeps Muon momentum per whole param (not aligned with the flat master)."""
    params = opt.params_in_partition[g]
    return bool(params) and opt._is_muon_group(params) and not opt.cpu_offload


def _muon_slots(opt: Any, g: int, buf: torch.Tensor) -> dict[int, torch.Tensor]:
    """id(param) -> [N] view of the whole-param Muon momentum of ZeRO-1/2 group ``g``."""
    params = opt.params_in_partition[g]
    expected = sum(p.numel() for p in params)
    if buf.numel() != expected:
        raise RuntimeError(f"ZeRO group {g}: Muon momentum_buffer has {buf.numel()} elements, expected the "
                           f"{expected} of the full params in this partition; DeepSpeed's layout changed?")
    slots, pos = {}, 0
    for p in params:  # concatenated in params_in_partition order, as get_flat_partition fills it
        slots[id(p)] = buf.narrow(0, pos, p.numel())
        pos += p.numel()
    return slots


def _fragments_zero12(engine: Any, names: dict[int, str]) -> Iterator[Fragment]:
    opt = engine.optimizer
    for g, lp_params in enumerate(opt.bit16_groups):
        flat = opt.single_partition_of_fp32_groups[g].detach()          # [P]
        state = opt.optimizer.state.get(opt.single_partition_of_fp32_groups[g], {})
        whole_layout = _muon_whole_layout(opt, g)
        slots = _muon_slots(opt, g, state[MUON_MOMENTUM]) if whole_layout and MUON_MOMENTUM in state else {}
        shaped = {k: v.detach() for k, v in state.items()
                  if torch.is_tensor(v) and v.shape == flat.shape and not (whole_layout and k == MUON_MOMENTUM)}
        for p in lp_params:
            hm = getattr(p, "_hp_mapping", None)
            if hm is None or id(p) not in names or hm.lp_fragment_address.numel == 0:
                continue  # no element of p in this rank's partition
            lp, hp = hm.lp_fragment_address, hm.hp_fragment_address
            # lp.start: offset inside flattened p; hp.start: offset inside the flat master [P]
            name, *aliases = names[id(p)]
            frag = Fragment(name, tuple(p.shape), lp.start, flat.narrow(0, hp.start, hp.numel), owner=state,
                            states={k: v.narrow(0, hp.start, hp.numel) for k, v in shaped.items()},
                            aliases=tuple(aliases))
            if id(p) in slots:
                frag.whole_states[MUON_MOMENTUM] = slots[id(p)].detach()
            yield frag


def _fragments_zero3(engine: Any, names: dict[int, str]) -> Iterator[Fragment]:
    opt = engine.optimizer
    for s, params in enumerate(opt.fp16_groups):
        flat = opt.fp32_partitioned_groups_flat[s].detach()
        state = opt.optimizer.state.get(opt.fp32_partitioned_groups_flat[s], {})
        shaped = {k: v.detach() for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape}
        for p in params:
            if id(p) not in names:
                continue
            _, start, part = opt.grad_position[opt.get_param_id(p)]  # part = ceil(N / dp), padded
            offset = opt._get_param_partition_rank(p) * part          # rank in p's own partition group
            n = max(0, min(part, p.ds_numel - offset))               # the last ranks' parts are padding
            if n == 0:
                continue
            name, *aliases = names[id(p)]
            yield Fragment(name, tuple(p.ds_shape), offset, flat.narrow(0, start, n), owner=state,
                           states={k: v.narrow(0, start, n) for k, v in shaped.items()}, aliases=tuple(aliases))


def local_fragments(engine: Any) -> list[Fragment]:
    """Every non-empty fragment of a trainable parameter this rank owns, in a deterministic order."""
    names = trainable_names(engine)
    gen = _fragments_zero3 if zero_stage(engine) == 3 else _fragments_zero12
    return list(gen(engine, names))


def has_optimizer_states(engine: Any) -> bool:
    """True once every flat master has optimizer state (DeepSpeed creates it at the first step)."""
    state = engine.optimizer.optimizer.state
    return all(len(state.get(f, {})) > 0 for f in master_flats(engine))


def _inner_optimizers(opt: Any) -> list[torch.optim.Optimizer]:
    found = [opt.optimizer]
    backup = getattr(opt, "backup_optimizer", None)  # ZeRO-3 offload keeps a second one for GPU sub-groups
    if backup is not None:
        found.append(backup)
    return found


@torch.no_grad()
def materialize_optimizer_states(engine: Any) -> bool:
    """Create the optimizer states a fresh engine lacks, equal to what the first step would create.

    DeepSpeed's optimizers create their state lazily inside ``step()``, so a fresh engine has
    nothing to load into. For every flat master without state we run DeepSpeed's own per-group
    step path (``_optimizer_step``) once with a zero gradient and ``lr = 0``, then undo it: the
    flat masters are restored bitwise from a copy, every tensor state is zeroed and scalar states
    (``step``) are reset to 0 of their own type. What remains is exactly the state a lazily
    initialising optimizer starts from (zero moments, step 0), so an untouched key behaves as if
    never stepped and a loaded key is simply overwritten. Muon momentum, which DeepSpeed creates
    outside the optimizer, is created here as zeros in DeepSpeed's layout. Local: no collectives.
    Returns whether anything was created.
    """
    stage, opt = zero_stage(engine), engine.optimizer
    flats = master_flats(engine)
    inner = opt.optimizer
    empty = [i for i, f in enumerate(flats) if len(inner.state.get(f, {})) == 0]
    created = bool(empty)
    if empty:
        saved_lr = [[grp["lr"] for grp in o.param_groups] for o in _inner_optimizers(opt)]
        saved = {i: (flats[i].detach().clone(), flats[i].grad) for i in empty}
        try:
            for o in _inner_optimizers(opt):
                for grp in o.param_groups:
                    grp["lr"] = 0.0
            for i in empty:
                flats[i].grad = torch.zeros_like(flats[i])
                opt._optimizer_step(i)  # ZeRO-1/2: group i; ZeRO-3: sub-group i (same path as a real step)
        finally:
            for o, lrs in zip(_inner_optimizers(opt), saved_lr):
                for grp, lr in zip(o.param_groups, lrs):
                    grp["lr"] = lr
            for i, (weights, grad) in saved.items():
                flats[i].data.copy_(weights)
                flats[i].grad = grad
        for i in empty:
            st = inner.state[flats[i]]
            for k, v in list(st.items()):
                if torch.is_tensor(v):
                    v.zero_()                 # moments and tensor ``step`` alike
                elif is_scalar(v):
                    st[k] = type(v)(0)        # an int/float ``step`` keeps its type
    created |= _create_muon_momentum(engine, stage, flats)
    if stage in (1, 2):
        # DeepSpeed links the per-param views of optimizer state (used by safe_get_full_optimizer_state)
        # once, right after group 0's first step, so groups 1.. stay unlinked; relink them all.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    return created


def _create_muon_momentum(engine: Any, stage: int, flats: list[torch.Tensor]) -> bool:
    opt, created = engine.optimizer, False
    state = opt.optimizer.state
    for i, flat in enumerate(flats):
        if stage == 3:
            is_muon = getattr(opt, "use_muon", False) and opt.sub_groups_using_muon[i]
            shape = flat.shape
        else:
            params = opt.params_in_partition[i]
            is_muon = bool(params) and opt._is_muon_group(params)
            shape = (sum(p.numel() for p in params),) if _muon_whole_layout(opt, i) else flat.shape
        if is_muon and MUON_MOMENTUM not in state.get(flat, {}):
            state.setdefault(flat, {})[MUON_MOMENTUM] = torch.zeros(shape, dtype=torch.float32, device=flat.device)
            created = True
    return created


@torch.no_grad()
def sync_model_weights(engine: Any) -> None:
    """Make the model (low-precision) weights equal to the fp32 masters after the masters changed.

    ZeRO-1/2: every rank holds whole params; DeepSpeed's ``update_lp_params`` copies each rank's
    master partition into its bit16 partition and all-gathers them over each group's dp group.
    ZeRO-3: copy each sub-group's fp32 flat into the partitioned ``ds_tensor`` storage
    (``_reassign_or_swap_out_partitioned_parameters``, as ``step`` does) inside the prologue /
    epilogue DeepSpeed uses around its own checkpoint loads (re-gathers persistent params).
    Collective over the dp groups: every rank must call it.
    """
    opt = engine.optimizer
    if zero_stage(engine) == 3:
        opt.checkpoint_event_prologue()
        for s in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(s)
        opt.checkpoint_event_epilogue()
    else:
        opt.update_lp_params()
