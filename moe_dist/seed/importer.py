"""``moe-ckpt import-seed FILE.pt --output-dir DIR``: a seed checkpoint as a moe_dist run folder.

The folder is what ``moe-train`` writes: ``config.yaml`` (the seed's model as ``--preset 4090`` /
``b200``, its batch, optimizers and LR schedule), ``metrics.jsonl`` and
``checkpoints/checkpoint_step_<S>`` in our DCP format, S being the seed's optimizer steps, so
``moe-train --config DIR/config.yaml --output-dir DIR --resume auto`` continues it on any world size
and layout. The checkpoint carries:

* the weights, renamed (``seed/keys.py``);
* Muon's momentum, from the seed's int positions to our names (an expert that never got a token
  has no entry: zeros, what Muon would have started it with);
* AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``;
* the LR schedule position: the seed's LambdaLR as ``warmup_steps = max_steps // 20``,
  ``warmup_from_zero``, cosine to 0.1x over ``max_steps``; the import checks that our next LR equals
  the seed scheduler's (``_last_lr``) for both optimizers and refuses otherwise;
* optimizer steps, micro-batches (the seed's ``step``), tokens, and the seed's metrics.

The data cursor starts fresh: the seed's order (stride-1 windows, ``random_split``) cannot be
replayed. The shards are written by the checkpoint's own writer (``EngineCheckpoint`` over the
imported tensors, then the manifest, expert audit and atomic publish the manager uses).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..checkpoint import layout
from ..checkpoint.errors import CheckpointError
from ..checkpoint.fragment import Fragment
from ..checkpoint.keys import FORMAT_VERSION
from ..config import RunConfig, apply_overrides, get_preset
from .keys import adamw_order, muon_order, our_name
from .load import SeedCheckpoint, load_seed

FRESH_CURSOR = ("data cursor starts fresh: the seed's data order (stride-1 windows, random_split) cannot be replayed, "
                "so the resumed run reads moe_dist's own shuffled order from its first batch")


def _count(state: dict[str, Any], prefix: str, suffix: str) -> int:
    n = 0
    while f"{prefix}{n}{suffix}" in state:
        n += 1
    return n


def _first(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:  # noqa: ANN401
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def run_config(sc: SeedCheckpoint, output_dir: str, overrides: dict[str, Any]) -> RunConfig:
    """The run of the seed's checkpoint: its preset, with sizes read from the tensors and the seed config."""
    sd, c = sc.model_state, sc.config
    V, d = sd["token_embedding.weight"].shape
    L = _count(sd, "transformer_blocks.", ".attention.qkv.weight")
    E = _count(sd, "transformer_blocks.0.feed_forward.experts.", ".linear1.weight")
    d_ff = sd["transformer_blocks.0.feed_forward.experts.0.linear1.weight"].shape[0]
    muon_g, adam_g = sc.optimizer_states[0]["param_groups"][0], sc.optimizer_states[1]["param_groups"][0]

    def need(key: str, *names: str) -> int:  # a field the tensors do not tell: the seed config's, or --set's
        value = overrides.get(key, _first(c, *names))
        if value is None:
            raise CheckpointError(f"{sc.path}: the seed config has none of {', '.join(names)}; pass it with "
                                  f"--set {key}=VALUE")
        return int(value)

    max_steps, seq = need("train.max_steps", "max_steps"), need("model.max_seq_len", "max_seq_len")
    micro, opt_steps = sc.micro_step, optimizer_steps(sc)
    accum = int(_first(c, "gradient_accumulation_steps", default=max(1, micro // max(opt_steps, 1))))
    batch = int(_first(c, "batch_size", default=get_preset(sc.preset).train.micro_batch_size))
    values = {
        "model.vocab_size": V, "model.d_model": d, "model.n_layers": L, "model.num_experts": E, "model.d_ff": d_ff,
        "model.n_heads": need("model.n_heads", "n_heads", "num_heads"),
        "model.top_k": int(_first(c, "expert_top_k", "top_k", default=2)),
        "model.max_seq_len": seq, "model.dropout": float(_first(c, "dropout", default=0.1)),
        "model.load_balancing_weight": float(_first(c, "load_balancing_weight", default=0.01)),
        "train.seq_len": seq, "train.micro_batch_size": batch, "train.global_batch_size": batch * accum,
        "train.max_steps": max_steps, "train.warmup_steps": max_steps // 20, "train.warmup_from_zero": True,
        "train.weight_decay_on": "adamw",
        "train.min_lr_ratio": 0.1, "train.muon_lr": float(muon_g["initial_lr"]),
        "train.adamw_lr": float(adam_g["initial_lr"]), "train.adam_betas": tuple(adam_g["betas"]),
        "train.weight_decay": float(adam_g["weight_decay"]), "train.muon_momentum": float(muon_g["momentum"]),
        "train.optimizer": "muon", "checkpoint.output_dir": output_dir,
    }
    if c.get("grad_clip") is not None:
        values["train.grad_clip"] = float(c["grad_clip"])
    return apply_overrides(get_preset(sc.preset), {**values, **overrides})


def optimizer_steps(sc: SeedCheckpoint) -> int:
    """Optimizer steps the seed took: its schedulers' ``last_epoch`` (they step once per optimizer step)."""
    epochs = {int(s["last_epoch"]) for s in sc.scheduler_states}
    if len(epochs) != 1:
        raise CheckpointError(f"{sc.path}: the two schedulers disagree on last_epoch ({sorted(epochs)})")
    return epochs.pop()


def check_next_lr(sc: SeedCheckpoint, cfg: RunConfig) -> dict[str, float]:
    """Our LRs for the next step; CheckpointError unless they equal the seed schedulers' ``_last_lr``."""
    from ..run.optim import LRSchedule

    ours = LRSchedule.from_config(cfg.train).lrs(optimizer_steps(sc))
    for (label, key), sched in zip((("Muon", "muon"), ("AdamW", "adamw")), sc.scheduler_states):
        theirs = float(sched["_last_lr"][0])
        if not math.isclose(ours[key], theirs, rel_tol=1e-9, abs_tol=1e-15):
            raise CheckpointError(f"{sc.path}: the {label} LR of the next step would be {ours[key]!r} here but the "
                                  f"seed's scheduler says {theirs!r}; pass the seed's schedule with --set "
                                  "train.max_steps=/train.warmup_steps=/train.muon_lr=/train.adamw_lr=")
    return ours


def _states(sc: SeedCheckpoint, L: int, E: int) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Our name -> optimizer states, and the Muon matrices that had no state (idle experts)."""
    sd, out, idle = sc.model_state, {}, []
    muon, adam = sc.optimizer_states[0]["state"], sc.optimizer_states[1]["state"]
    for label, order, state in (("Muon", muon_order(L, E), muon), ("AdamW", adamw_order(L, E), adam)):
        n_params = len(sc.optimizer_states[0 if label == "Muon" else 1]["param_groups"][0]["params"])
        if n_params != len(order):
            raise CheckpointError(f"{sc.path}: the seed's {label} has {n_params} parameters, expected {len(order)} for "
                                  f"{L} layers of {E} experts")
        for pos, seed_name in enumerate(order):
            shape = tuple(sd[seed_name].shape)
            entry = state.get(pos)
            if entry is None:
                if label == "AdamW":
                    raise CheckpointError(f"{sc.path}: AdamW has no state for {seed_name} (position {pos})")
                idle.append(our_name(seed_name))
                entry = {"momentum_buffer": torch.zeros(shape, device="cpu")}
            got = {k: v for k, v in entry.items() if torch.is_tensor(v) and v.dim() > 0}
            for k, v in got.items():
                if tuple(v.shape) != shape:
                    raise CheckpointError(f"{sc.path}: {label} state {pos} '{k}' has shape {tuple(v.shape)} but "
                                          f"{seed_name} is {shape}; the parameter order is not the seed's")
            if label == "AdamW":
                got["step"] = torch.as_tensor(entry["step"], dtype=torch.float32).reshape(())
            out[our_name(seed_name)] = got
    return out, idle


class _ImportedState:
    """The engine seam the checkpoint writer asks (``checkpoint_fragments``), over whole CPU tensors."""

    def __init__(self, weights: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]],
                 tied: bool) -> None:
        self.fragments = []
        for name, w in weights.items():
            if name == "lm_head.weight" and tied:
                continue
            st = states.get(name, {})
            flat = {k: v.float().contiguous().reshape(-1) for k, v in st.items() if k != "step"}
            owner = {"step": st["step"]} if "step" in st else {}
            aliases = ("lm_head.weight",) if name == "embed.weight" and tied else ()
            self.fragments.append(Fragment(name, tuple(w.shape), 0, w.float().contiguous().reshape(-1), states=flat,
                                           owner=owner, aliases=aliases))

    def checkpoint_fragments(self) -> list[Fragment]:
        return self.fragments


def _metrics_row(sc: SeedCheckpoint, step: int, tokens: int, lrs: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step, "tokens": tokens, "micro_batches": sc.micro_step, "source": "seed import",
                           "lr": lrs["muon"], "lr_muon": lrs["muon"], "lr_adamw": lrs["adamw"]}
    for k, v in sc.metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            row[f"seed_{k}" if k in row else k] = v
    # Every row has a loss (summaries and plots read it): the seed's last train loss, else its val loss.
    loss = row.get("train_loss", row.get("val_loss"))
    if loss is not None:
        row["loss"] = loss
    return row


def as_export(path: str | Path) -> dict[str, Any]:
    """A seed ``.pt`` in the shape of a moe-consolidate ``.pt`` (our names and config), for every weights
    loader: ``load_checkpoint``, ``load_model_for_inference``, ``moe-generate``, ``--init-from``. Its
    ``step`` is the seed's own (micro-batches), as the seed's ``load_checkpoint`` returns it."""
    sc = load_seed(path)
    cfg = run_config(sc, "runs/from_seed", {})
    return {"model_state_dict": {our_name(k): v for k, v in sc.model_state.items()}, "config": cfg.to_dict(),
            "step": sc.micro_step, "metrics": sc.metrics, "tokenizer": {}}


def import_seed(src: str, output_dir: str, overrides: Optional[dict[str, Any]] = None,
                log: Callable[[str], None] = print) -> Path:
    """Write the run folder; returns the checkpoint folder. CheckpointError in one line on any problem."""
    import torch.distributed.checkpoint as dcp

    from ..checkpoint.audit import audit_experts
    from ..checkpoint.dcp_state import EngineCheckpoint
    from ..checkpoint.manifest import config_hash, write_manifest
    from ..run.artifacts import write_config

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--output-dir {out}: not empty; import into a new folder (nothing was written)")
    sc = load_seed(src)
    cfg = run_config(sc, str(out), overrides or {})
    m = cfg.model
    lrs = check_next_lr(sc, cfg)
    step = optimizer_steps(sc)
    tokens = sc.micro_step * cfg.train.micro_batch_size * cfg.train.seq_len
    weights = {our_name(k): v for k, v in sc.model_state.items()}
    states, idle = _states(sc, m.n_layers, m.num_experts)

    root = layout.checkpoints_dir(str(out))
    root.mkdir(parents=True)
    final = root / layout.step_dir_name(step)
    tmp = layout.tmp_dir_for(root, step, f"{int(time.time())}-import")
    tmp.mkdir()
    try:
        with _one_process_group():  # the writer's ShardedTensors need a process group: this process alone
            dcp.save(EngineCheckpoint(_ImportedState(weights, states, m.tie_embeddings)).for_save(),
                     checkpoint_id=str(tmp))
        row = _metrics_row(sc, step, tokens, lrs)
        rows = [row] if "loss" in row else []  # a history row needs a loss (run summaries read it)
        topology = {"world_size": 1, "engine": "seed-import", "zero_stage": None, "ep_size": 1, "optimizer": "muon"}
        state = {"format_version": FORMAT_VERSION, "step": step, "tokens": tokens,
                 "trainer": {"step": step, "tokens": tokens, "last_val_loss": sc.metrics.get("val_loss")},
                 "sampler": {"fresh": True, "global_batch_size": cfg.train.global_batch_size, "seed": cfg.train.seed},
                 "lr_schedule": {**_schedule(cfg)}, "config": cfg.to_dict(), "tokenizer": {}, "data": None,
                 "metrics": {"last": row, "history": rows}, "topology": topology,
                 "imported_from": {"path": str(sc.path), "seed_class": sc.config_class, "micro_batches": sc.micro_step,
                                   "idle_experts_without_momentum": idle},
                 "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__}
        layout.write_file_atomic(tmp / layout.TRAIN_STATE, json.dumps(state, indent=1, default=float).encode())
        audit_experts(tmp, m)
        write_manifest(tmp, {"step": step, "tokens": tokens, "topology": topology,
                             "model_config_hash": config_hash(state["config"]["model"])})
        layout.publish(tmp, final)
        layout.point_latest(root, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    write_config(cfg, str(out))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log(f"imported {sc.path} (seed {sc.preset}, step {sc.micro_step} micro-batches = {step} optimizer steps, "
        f"{tokens:,} tokens) into {final}; {len(idle)} idle expert matrices had no Muon momentum (zeros)")
    log(FRESH_CURSOR)
    log(f"continue with: moe-train --config {out / 'config.yaml'} --output-dir {out} --resume auto")
    return final


@contextlib.contextmanager
def _one_process_group() -> Iterator[None]:
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _schedule(cfg: RunConfig) -> dict[str, Any]:
    from ..run.optim import LRSchedule

    return LRSchedule.from_config(cfg.train).state_dict()
