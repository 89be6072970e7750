"""One rank of a ZeRO <-> DCP round trip, launched by ``test_zero_dcp.py`` through ``harness``.

``save``: build a DeepSpeed engine on a toy model, train ``--steps`` steps, write the checkpoint
through ``EngineCheckpoint`` and, on rank 0, ``--ref``: every full fp32 master / optimizer state /
scalar gathered through DeepSpeed's own APIs (not through the code under test), plus the losses
of two more steps (the first one's update uses the optimizer states, so the second loss only
matches after a resume if the states round-tripped). It also checks that the files hold exactly
the gathered values (``format_utils.dcp_to_torch_save``).
``load``: build an engine with another world size / stage / offload, load through
``EngineCheckpoint(...).for_load()`` + ``dcp.load``, and compare bitwise with the reference; then run the same two steps and compare the losses.

The global batch (12 rows) is split evenly over the ranks, so every world size sees the same
global mean loss and gradient (up to reduction order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

GLOBAL_BATCH, D_IN, D_OUT = 12, 7, 5
NUM_EXPERTS = 2


class Toy(nn.Module):
    """Odd sizes so ZeRO fragments split parameters mid-way; ``gain`` is 1-D; experts are optional."""

    def __init__(self, experts: list[int]) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, 13)
        self.hid = nn.Linear(13, 11, bias=False)
        self.out = nn.Linear(11, D_OUT)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, D_OUT))
        self.experts = nn.ModuleDict({str(e): nn.Linear(11, 11, bias=False) for e in range(NUM_EXPERTS)})
        for key in list(self.experts):  # built for all, kept for ours: same init on any layout
            if int(key) not in experts:
                del self.experts[key]

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        h_BH = torch.tanh(self.hid(torch.tanh(self.inp(x_BD))))
        for expert in self.experts.values():
            h_BH = h_BH + torch.tanh(expert(h_BH))
        return self.out(h_BH) * self.gain


def ds_config(args: argparse.Namespace, world: int) -> dict[str, Any]:
    if args.optimizer == "muon":
        opt = {"type": "Muon", "params": {"lr": 0.01, "muon_lr": 0.02, "adam_lr": 0.003, "momentum": 0.9,
                                          "weight_decay": 0.01, "betas": [0.9, 0.99]}}
    else:
        opt = {"type": "AdamW", "params": {"lr": 0.003, "weight_decay": 0.01, "betas": [0.9, 0.99]}}
    zero: dict[str, Any] = {"stage": args.stage}
    if args.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if args.offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    if args.stage == 3:
        # Params up to 20 elements (biases, gain) stay gathered ("persistent"); the matrices live
        # only as ds_tensor partitions. Both paths must get the loaded weights.
        zero["stage3_param_persistence_threshold"] = 20
    if args.stage == 3 and args.optimizer == "muon":
        zero["reduce_scatter"] = False  # DeepSpeed refuses Muon with ZeRO-3 reduce-scatter
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
            "optimizer": opt, "zero_optimization": zero, "steps_per_print": 10 ** 6}


def build_engine(args: argparse.Namespace) -> Any:
    import deepspeed

    rank, world = dist.get_rank(), dist.get_world_size()
    ep = world if args.ep else 1
    experts = [e for e in range(NUM_EXPERTS) if e % ep == rank % ep] if args.ep else list(range(NUM_EXPERTS))
    torch.manual_seed(0)
    model = Toy(experts)
    for name, p in model.named_parameters():
        p.use_muon = p.ndim == 2
    if args.ep and ep > 1:
        # Real DeepSpeed expert parallelism: expert params are reduced/partitioned over the
        # expert-data-parallel group only, so each rank holds experts the others lack.
        from deepspeed.moe.layer import MoE
        from deepspeed.utils import groups

        deepspeed.init_distributed(dist_backend="gloo")  # deepspeed.comm wraps the existing group
        groups._create_expert_and_data_parallel(ep)
        group_name = f"ep_size_{ep}"
        for p in model.experts.parameters():
            p.allreduce, p.group_name = False, group_name
        # The engine keys expert handling on isinstance(MoE) and calls set_deepspeed_parallelism,
        # which on a real MoE layer wires its gate; our groups already exist.
        model.__class__ = type("MarkedToy", (Toy, MoE), {"set_deepspeed_parallelism": lambda self, *a, **k: None})
        model.num_experts, model.num_local_experts = NUM_EXPERTS, len(experts)
        model.expert_group_name, model.ep_size = group_name, ep
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                      config=ds_config(args, world))
    return engine


def seam(engine: Any) -> Any:
    """The DeepSpeed engine behind the engine seam, as the checkpoint sees it."""
    from moe_dist.parallel.deepspeed.engine import DeepSpeedTrainEngine

    return DeepSpeedTrainEngine(engine)


class Renamed:
    """An engine whose checkpoint runs carry other names (to provoke the checkpoint's errors)."""

    def __init__(self, engine: Any, rename: Any) -> None:
        self.inner, self.rename = seam(engine), rename

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def checkpoint_fragments(self) -> list:
        frags = self.inner.checkpoint_fragments()
        for f in frags:
            f.name = self.rename(f.name)
        return frags


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of global batch ``step`` (identical global data for every world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, D_IN, generator=g), torch.randn(GLOBAL_BATCH, D_OUT, generator=g)
    m = GLOBAL_BATCH // dist.get_world_size()
    rows = slice(dist.get_rank() * m, (dist.get_rank() + 1) * m)
    return x[rows], y[rows]


def global_loss(err_BD: torch.Tensor) -> float:
    """Mean squared error over the global batch, summed in float64 so the world size does not show."""
    t = err_BD.detach().to(torch.float64).pow(2).sum()
    dist.all_reduce(t)
    return t.item() / (GLOBAL_BATCH * D_OUT)


def train_step(engine: Any, step: int) -> float:
    x, y = batch(step)
    err = engine(x) - y
    engine.backward(err.pow(2).mean())
    engine.step()
    return global_loss(err)


def eval_loss(engine: Any, step: int) -> float:
    x, y = batch(step)
    with torch.no_grad():
        return global_loss(engine(x) - y)


# ----------------------------------------------------------------------------- reference values
def _group_state(engine: Any, p: torch.Tensor) -> tuple[dict, torch.Tensor]:
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        flat = opt.fp32_partitioned_groups_flat[opt.grad_position[opt.get_param_id(p)][0]]
    else:
        g = next(i for i, grp in enumerate(opt.bit16_groups) if any(q is p for q in grp))
        flat = opt.single_partition_of_fp32_groups[g]
    return opt.optimizer.state.get(flat, {}), flat


def _whole_muon(engine: Any, p: torch.Tensor) -> bool:
    opt = engine.optimizer
    if not hasattr(opt, "params_in_partition") or opt.cpu_offload:
        return False
    g = next(i for i, grp in enumerate(opt.bit16_groups) if any(q is p for q in grp))
    return bool(opt.params_in_partition[g]) and opt._is_muon_group(opt.params_in_partition[g])


def _muon_momentum_full(engine: Any, p: torch.Tensor) -> torch.Tensor:
    """ZeRO-1/2 Muon keeps the whole param's momentum on every rank whose partition touches it:
    take the lowest such rank's copy and check the others hold the same."""
    opt = engine.optimizer
    g = next(i for i, grp in enumerate(opt.bit16_groups) if any(q is p for q in grp))
    params, pos, mine = opt.params_in_partition[g], 0, None
    buf = opt.optimizer.state[opt.single_partition_of_fp32_groups[g]]["momentum_buffer"]
    for q in params:
        if q is p:
            mine = buf.narrow(0, pos, q.numel()).clone()
        pos += q.numel()
    group = p._dp_group
    me = dist.get_rank(group)
    first = torch.tensor([me if mine is not None else 1 << 30])
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    out = mine.clone() if (mine is not None and me == first.item()) else torch.zeros(p.numel())
    dist.all_reduce(out, group=group)
    if mine is not None:
        assert torch.equal(mine, out), f"ranks hold different Muon momentum for {p.shape}"
    return out


def full_values(engine: Any) -> dict[str, Any]:
    """Every full master / state / scalar through DeepSpeed's APIs, merged on all ranks."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed links per-param state views for group 0 only (after its first step); relink all.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    mine: dict[str, Any] = {}
    for name, p in engine.module.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        mine[f"model.{name}"] = safe_get_full_fp32_param(p).detach().reshape(shape).clone().cpu()
        state, flat = _group_state(engine, p)
        for key, v in sorted(state.items()):
            if key == "momentum_buffer" and _whole_muon(engine, p):
                mine[f"optim.state.{name}.{key}"] = _muon_momentum_full(engine, p).reshape(shape)
            elif torch.is_tensor(v) and v.shape == flat.shape:
                mine[f"optim.state.{name}.{key}"] = (safe_get_full_optimizer_state(p, key).detach().reshape(shape)
                                                     .clone().cpu())
            elif not torch.is_tensor(v) or v.dim() == 0:
                mine[f"optim.state.{name}.{key}"] = float(v)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    merged: dict[str, Any] = {}
    for d in gathered:
        merged.update(d)
    return merged


def model_weights_match_masters(engine: Any, values: dict[str, Any]) -> None:
    """The weights the model computes with equal the fp32 masters (fp32 training: bitwise)."""
    import deepspeed

    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                w = p.data.detach().clone()
        else:
            w = p.data.detach().clone()
        assert torch.equal(w.cpu(), values[f"model.{name}"]), f"model weight {name} != its fp32 master after load"


# ----------------------------------------------------------------------------- modes
def save_with_reference(engine: Any, ckpt: str, ref: str, done: int) -> dict[str, Any]:
    """Save through ``EngineCheckpoint``; rank 0 writes the reference (values + the next two losses)."""
    import torch.distributed.checkpoint as dcp

    from moe_dist.checkpoint.dcp_state import EngineCheckpoint

    t0 = time.perf_counter()
    dcp.save(EngineCheckpoint(seam(engine)).for_save(), checkpoint_id=ckpt)
    save_s = time.perf_counter() - t0
    values = full_values(engine)
    if dist.get_rank() == 0:
        check_files_hold(ckpt, values, os.path.join(os.path.dirname(ref), f"flat-{os.path.basename(ref)}"))
    next_losses = [train_step(engine, done), eval_loss(engine, done + 1)]
    if dist.get_rank() == 0:
        torch.save({"values": values, "done": done, "next_losses": next_losses}, ref)
    return {"next_losses": next_losses, "save_s": save_s, "saved_keys": len(values)}


def check_files_hold(ckpt: str, values: dict[str, Any], scratch: str) -> None:
    """The DCP files, assembled into full tensors offline, hold exactly the engine's values, in the
    parameters' own shapes and in the nesting of ``get_state_dict`` (``{"model": .., "optim": {"state": ..}}``)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, scratch)
    nested = torch.load(scratch, weights_only=True)
    assert set(nested) <= {"model", "optim"}, f"top-level keys {sorted(nested)}"
    on_disk = {f"model.{k}": v for k, v in nested["model"].items()}
    for name, states in nested.get("optim", {}).get("state", {}).items():
        on_disk.update({f"optim.state.{name}.{s}": v for s, v in states.items()})
    assert set(values) == set(on_disk), f"saved keys differ from the engine's: {sorted(set(values) ^ set(on_disk))}"
    for k, v in values.items():
        if torch.is_tensor(v):
            assert on_disk[k].shape == v.shape, f"{k}: saved as {tuple(on_disk[k].shape)}, the parameter is {tuple(v.shape)}"
            assert torch.equal(on_disk[k], v), f"{k}: the DCP files differ from the engine's state"
        else:
            assert float(on_disk[k]) == v, f"{k}: saved {float(on_disk[k])}, engine {v}"


def expect_error(fn: Any, *fragments: str) -> None:
    """``fn`` raises CheckpointError on this rank (on every rank: none may hang) naming ``fragments``."""
    from moe_dist.checkpoint.errors import CheckpointError

    try:
        fn()
    except CheckpointError as e:
        for text in fragments:
            assert text in str(e), f"error does not mention {text!r}: {e}"
    else:
        raise AssertionError(f"expected a CheckpointError mentioning {fragments}")


def do_save(args: argparse.Namespace, engine: Any) -> dict[str, Any]:
    losses = [train_step(engine, s) for s in range(args.steps)]
    if args.check_errors:
        import re

        from moe_dist.checkpoint.dcp_state import EngineCheckpoint

        # Under EP, names that drop the global expert index make two ranks claim one key.
        renamed = Renamed(engine, lambda n: re.sub(r"experts\.\d+", "experts.X", n))
        expect_error(lambda: EngineCheckpoint(renamed).for_save(), "model.experts.X.weight", "overlaps",
                     "global index")
    return {"losses": losses, **save_with_reference(engine, args.ckpt, args.ref, args.steps)}


def do_load(args: argparse.Namespace, engine: Any) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from moe_dist.checkpoint.dcp_state import EngineCheckpoint, read_saved_keys
    from moe_dist.parallel.deepspeed.fragments import has_optimizer_states

    if args.check_errors:
        # A model key the checkpoint lacks is named with the path, on every rank.
        renamed = Renamed(engine, lambda n: "renamed." + n)
        expect_error(lambda: EngineCheckpoint(renamed, saved=read_saved_keys(args.ckpt)).for_load()["model"]
                     .state_dict(), "'model.renamed.", args.ckpt)
    t0 = time.perf_counter()
    dcp.load(EngineCheckpoint(seam(engine), saved=read_saved_keys(args.ckpt)).for_load(), checkpoint_id=args.ckpt)
    load_s = time.perf_counter() - t0
    values = full_values(engine)
    model_weights_match_masters(engine, values)
    ref = torch.load(args.ref, weights_only=True)
    report: dict[str, Any] = {"load_s": load_s}
    if dist.get_rank() == 0:
        saved = ref["values"]
        for k, v in values.items():
            assert k in saved, f"{k} is in the loaded engine but not in the reference"
            if torch.is_tensor(v):
                assert torch.equal(v, saved[k]), f"{k}: loaded != saved (max diff {(v - saved[k]).abs().max()})"
            else:
                assert v == saved[k], f"{k}: loaded {v} != saved {saved[k]}"
        missing = [k for k in saved if k.startswith("model.") and k not in values]
        assert not missing, f"model keys saved but not loaded: {missing}"
        report["compared"] = len(values)
    if args.expect_no_optim:
        assert not has_optimizer_states(engine), "a weights-only checkpoint must not create optimizer states"
    done = ref["done"]
    if args.compare_losses:
        next_losses = [train_step(engine, done), eval_loss(engine, done + 1)]
        for mine, theirs in zip(next_losses, ref["next_losses"]):
            assert abs(mine - theirs) <= 1e-6, f"resumed loss {mine!r} != saved run's {theirs!r}"
        report["next_losses"] = next_losses
        done += 1
    if args.then_save:
        report["then"] = save_with_reference(engine, args.then_save, args.then_ref, done)
    return report


def do_materialize_check(args: argparse.Namespace, engine: Any) -> dict[str, Any]:
    """A materialised-then-trained engine follows the lazily initialised one bitwise."""
    from moe_dist.parallel.deepspeed.fragments import has_optimizer_states, materialize_optimizer_states

    twin = build_engine(args)
    before = full_values(twin)
    assert materialize_optimizer_states(twin) and has_optimizer_states(twin)
    after = full_values(twin)
    for k, v in after.items():
        if k.startswith("model."):
            assert torch.equal(v, before[k]), f"materialising changed the master {k}"
        elif torch.is_tensor(v):
            assert not v.any(), f"materialised state {k} is not zero"
        else:
            assert v == 0, f"materialised scalar {k} = {v}, expected 0"
    la = [train_step(engine, s) for s in range(args.steps)]
    lb = [train_step(twin, s) for s in range(args.steps)]
    va, vb = full_values(engine), full_values(twin)
    assert la == lb, f"losses differ: lazy {la} vs materialised {lb}"
    assert va.keys() == vb.keys(), f"state keys differ: {sorted(va.keys() ^ vb.keys())}"
    for k in va:
        same = torch.equal(va[k], vb[k]) if torch.is_tensor(va[k]) else va[k] == vb[k]
        assert same, f"{k} differs between the lazily initialised and the materialised engine"
    return {"losses": la}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["save", "load", "materialize"])
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--optimizer", choices=["muon", "adamw"], default="adamw")
    ap.add_argument("--offload", choices=["none", "optimizer", "all"], default="none")
    ap.add_argument("--ep", action="store_true", help="expert parallelism over the whole world")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--ref", default="")
    ap.add_argument("--report", default="")
    ap.add_argument("--compare-losses", action="store_true")
    ap.add_argument("--expect-no-optim", action="store_true")
    ap.add_argument("--then-save", default="", help="load mode: afterwards save again here (a resumed run's save)")
    ap.add_argument("--then-ref", default="")
    ap.add_argument("--check-errors", action="store_true", help="first check that misuse raises on every rank")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    t0 = time.perf_counter()
    engine = build_engine(args)
    init_s = time.perf_counter() - t0
    report = {"save": do_save, "load": do_load, "materialize": do_materialize_check}[args.mode](args, engine)
    report["init_s"] = init_s
    if args.report and dist.get_rank() == 0:
        with open(args.report, "w") as fh:
            json.dump(report, fh)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # ZeRO-3 (with or without offload) can abort in C++ destructors at interpreter exit
    # ("terminate called without an active exception"); the work is done and flushed, skip them.
    os._exit(0)


if __name__ == "__main__":
    main()
