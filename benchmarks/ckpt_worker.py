"""One rank of the checkpoint benchmarks (sections 2-4), started N times by ``common.run_distributed``.

Every mode builds the training state the way ``moe_dist/train.py`` does (``init_runtime``,
``MoETransformer``, expert parallelism, ``prepare_engine``, ``Trainer``, ``CheckpointManager``),
with small batches (the checkpoint's size depends on the model, not on the batch). Modes, which
may be chained (``--mode bench,stall``): all ranks run the same sequence, rank 0 writes ``--out``.

* ``bench`` (section 2): train ``--steps`` steps so optimizer states exist, then time, on the
  same engine, interleaved over ``--reps`` repetitions, each contender's save and load of the
  full training state: our ``CheckpointManager`` (DCP + manifest; its load checks the manifest's
  checksums first, as a resume does, and is timed phase by phase: ``phase_timer``), bare DCP
  (``EngineCheckpoint`` + ``dcp.save``), DeepSpeed's ``engine.save_checkpoint`` /
  ``load_checkpoint``, ``torch.save`` of the full state gathered on rank 0 (loaded back with
  ``torch.load`` on every rank), and the raw disk: the same bytes written (with fsync) and read
  back by plain file I/O. Every save includes an fsync of what it wrote (DCP's ``sync_files``;
  the others fsync their files after writing), so all contenders pay for durable writes.
  Finally one ``CheckpointManager`` checkpoint is kept for sections 4 and 5.
* ``save``: train and keep one checkpoint (sections 4/5 without section 2).
* ``load`` (section 4): build at this world size, untrained, and load ``--ckpt`` ``--reps`` times.
* ``stall`` (section 3): train without checkpoints, then in blocks that each end with a save,
  alternating a synchronous and (``--async-save``) an async ``CheckpointManager``; every step's
  training part and checkpoint-hook part are timed apart.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .common import SIZES, dir_bytes, interleave

# Small steps: global batch 6 splits on 1, 2 and 3 ranks (section 4 loads on all three).
CKPT_SETS = ["--set", "train.global_batch_size=6", "--set", "train.micro_batch_size=1", "--set", "train.seq_len=32",
             "--set", "train.eval_every=0", "--set", "train.warmup_steps=1", "--set", "data.max_corpus_bytes=200000",
             "--save-every", "0"]
CHUNK = 8 << 20


def build(size: str, output_dir: Path, extra: list[str]) -> SimpleNamespace:
    """Engine, trainer and checkpoint manager, built as ``moe_dist.train._train`` builds them."""
    from moe_dist.checkpoint.manager import CheckpointManager
    from moe_dist.run.cli import parse
    from moe_dist.data.loader import build_data
    from moe_dist.data.sampler import GlobalCursorSampler
    from moe_dist.run.metrics import MetricsLog
    from moe_dist.parallel.runtime import build_engine, init_runtime
    from moe_dist.run.trainer import Trainer

    args, cfg = parse([*SIZES[size], *CKPT_SETS, "--output-dir", str(output_dir), *extra])
    data = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed)
    rt = init_runtime(cfg, args.deepspeed_config)
    model, engine = build_engine(rt, cfg)
    sampler = GlobalCursorSampler(len(data.train_blocks), cfg.train.global_batch_size, cfg.train.seed)
    metrics = MetricsLog(str(output_dir / "metrics.jsonl"), enabled=rt.is_main)
    trainer = Trainer(cfg, rt, engine, data, sampler, metrics)
    ckpt = CheckpointManager(cfg, rt, engine, trainer, tokenizer_spec=data.tokenizer.to_spec())
    params = sum(p.numel() for p in model.parameters())
    return SimpleNamespace(cfg=cfg, rt=rt, engine=engine, trainer=trainer, ckpt=ckpt, metrics=metrics,
                           local_params=params)


def train(b: SimpleNamespace, steps: int) -> None:
    for _ in range(steps):
        record = b.trainer.train_step()
        if b.rt.is_main:
            b.metrics.write(record)


def barrier() -> None:
    dist.barrier()


def synced(fn: Callable[[], Any]) -> float:
    """Seconds from a barrier before ``fn`` to a barrier after it: the slowest rank's time."""
    barrier()
    t0 = time.perf_counter()
    fn()
    barrier()
    return time.perf_counter() - t0


def fsync_tree(path: Path) -> None:
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def on_rank0(fn: Callable[[], Any]) -> None:
    """Run ``fn`` on rank 0 only (clean-up, fsync), then let every rank continue together."""
    if dist.get_rank() == 0:
        fn()
    barrier()


# (module, attribute) whose time inside one of our saves / loads is reported as a phase; a name
# that is missing (renamed) is skipped, not an error.
SAVE_PHASES = {"save: DCP write (incl. fsync)": ("torch.distributed.checkpoint", "save"),
               "save: fsync (every file and folder)": ("os", "fsync"),
               "save: hash own shards": ("moe_dist.checkpoint.manager", "own_shard_entries"),
               "save: expert audit (rank 0)": ("moe_dist.checkpoint.manager", "audit_experts"),
               "save: manifest (rank 0)": ("moe_dist.checkpoint.manager", "write_manifest"),
               "save: rename + latest (rank 0)": ("moe_dist.checkpoint.layout", "publish")}
LOAD_PHASES = {"load: DCP read": ("torch.distributed.checkpoint", "load"),
               "load: model weights from the loaded masters": ("moe_dist.parallel.deepspeed.fragments",
                                                               "sync_model_weights")}


@contextlib.contextmanager
def phase_timer(targets: dict[str, tuple[str, str]]) -> Iterator[dict[str, float]]:
    """Seconds this rank spends inside each target function while the block runs (wrapped, then restored)."""
    seconds: dict[str, float] = {}
    restore: list[tuple[Any, str, Any]] = []

    def wrap(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t0
        return timed

    for label, (module, attr) in targets.items():
        obj = importlib.import_module(module)
        if hasattr(obj, attr):
            seconds[label] = 0.0
            restore.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, wrap(label, getattr(obj, attr)))
    try:
        yield seconds
    finally:
        for obj, attr, fn in reversed(restore):
            setattr(obj, attr, fn)


# ----------------------------------------------------------------------------- contenders
def gather_full_state(engine: Any) -> Optional[dict[str, torch.Tensor]]:
    """Every rank's ZeRO fragments assembled into full tensors on rank 0 (None elsewhere).

    Nested as a checkpoint is (``{"model": {name: S}, "optim": {"state": {name: {state: S}}}}``),
    so ``EngineCheckpoint.load_whole`` can load the file back.
    """
    pieces: list[tuple[tuple[str, ...], int, tuple[int, ...], torch.Tensor]] = []  # (path, offset, shape, [n])
    scalars: dict[tuple[str, ...], float] = {}
    for f in engine.checkpoint_fragments():
        pieces.append((("model", f.name), f.offset, f.shape, f.master.detach().clone()))
        for state, t in f.states.items():
            pieces.append((("optim", f.name, state), f.offset, f.shape, t.detach().clone()))
        for state, whole in f.whole_states.items():  # [N] on this rank: send the owned span only
            pieces.append((("optim", f.name, state), f.offset, f.shape, whole.narrow(0, f.offset, f.n).clone()))
        for state, v in f.scalars().items():
            scalars[("optim", f.name, state)] = float(v.item() if torch.is_tensor(v) else v)
    rank = dist.get_rank()
    gathered: Optional[list[Any]] = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((pieces, scalars), gathered, dst=0)
    if rank != 0:
        return None
    full: dict[str, Any] = {"model": {}, "optim": {"state": {}}}

    def slot(path: tuple[str, ...]) -> tuple[dict, str]:
        if path[0] == "model":
            return full["model"], path[1]
        return full["optim"]["state"].setdefault(path[1], {}), path[2]

    for rank_pieces, rank_scalars in gathered:
        for path, off, shape, t in rank_pieces:
            where, key = slot(path)
            where.setdefault(key, torch.empty(shape, dtype=t.dtype)).view(-1).narrow(0, off, t.numel()).copy_(t)
        for path, v in rank_scalars.items():
            where, key = slot(path)
            where[key] = torch.tensor(v, dtype=torch.float32)
    return full


class Contenders:
    """Save/load of the same engine by every contender; each call returns named seconds."""

    def __init__(self, b: SimpleNamespace, root: Path) -> None:
        self.b, self.root = b, root
        self.bytes: dict[str, int] = {}
        self.raw_bytes = 0

    def _record_bytes(self, name: str, path: Path) -> None:
        if dist.get_rank() == 0:
            self.bytes[name] = dir_bytes(path)

    def ours(self) -> dict[str, float]:
        """Save, then load as a resume does: rank 0 verifies the manifest (sizes + checksums, as
        ``choose_resume`` with ``checkpoint.verify``) while the others wait, then every rank loads;
        and the load alone (verify off). Each phase's share of rank 0's time is reported too."""
        from moe_dist.checkpoint.manifest import verify_manifest

        ckpt = self.b.ckpt
        saved: list[Path] = []
        with phase_timer(SAVE_PHASES) as save_parts:
            out = {"save": synced(lambda: saved.append(ckpt.save()))}
        path = saved[0]
        self._record_bytes("ours: CheckpointManager", path)

        def verified_load() -> None:
            t0 = time.perf_counter()
            if dist.get_rank() == 0:
                verify_manifest(path)
            load_parts["load: verify (rank 0)"] = time.perf_counter() - t0
            barrier()
            ckpt.load(path)

        load_parts: dict[str, float] = {}
        with phase_timer(LOAD_PHASES) as timed:
            out["load"] = synced(verified_load)
        load_parts.update(timed)
        out["load (verify off)"] = synced(lambda: ckpt.load(path))
        on_rank0(lambda: shutil.rmtree(ckpt.root, ignore_errors=True))
        return {**out, **save_parts, **load_parts}

    def bare_dcp(self) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

        from moe_dist.checkpoint.dcp_state import EngineCheckpoint, read_saved_keys

        engine, path = self.b.engine, self.root / "dcp"
        on_rank0(lambda: path.mkdir(parents=True, exist_ok=True))

        def save() -> None:
            dcp.save(EngineCheckpoint(engine).for_save(), storage_writer=FileSystemWriter(str(path), sync_files=True))

        def load() -> None:
            dcp.load(EngineCheckpoint(engine, saved=read_saved_keys(str(path))).for_load(),
                     storage_reader=FileSystemReader(str(path)))

        return self._save_then_load("ours: bare DCP", path, save, load)

    def deepspeed(self) -> dict[str, float]:
        engine, path = self.b.engine.ds, self.root / "deepspeed"  # the DeepSpeedEngine behind the seam

        def save() -> None:
            engine.save_checkpoint(str(path), tag="bench", client_state={}, save_latest=True)
            on_rank0(lambda: fsync_tree(path))

        def load() -> None:
            load_path, _ = engine.load_checkpoint(str(path), tag="bench", load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed load_checkpoint found nothing at {path}")

        return self._save_then_load("DeepSpeed save_checkpoint", path, save, load)

    def _save_then_load(self, label: str, path: Path, save: Callable[[], None],
                        load: Callable[[], None]) -> dict[str, float]:
        """Time one save and one load (every rank in step), record the bytes written, clean up."""
        out = {"save": synced(save)}
        self._record_bytes(label, path)
        out["load"] = synced(load)
        on_rank0(lambda: shutil.rmtree(path, ignore_errors=True))
        return out

    def torch_save(self) -> dict[str, float]:
        from moe_dist.checkpoint.dcp_state import EngineCheckpoint

        engine, path = self.b.engine, self.root / "full_state.pt"
        out: dict[str, float] = {}
        box: dict[str, Any] = {}

        def save() -> None:
            t0 = time.perf_counter()
            box["full"] = gather_full_state(engine)
            box["gather"] = time.perf_counter() - t0
            if box["full"] is not None:
                with open(path, "wb") as f:
                    torch.save(box["full"], f)
                    f.flush()
                    os.fsync(f.fileno())
            box.pop("full")

        def load() -> None:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            EngineCheckpoint(engine).load_whole(sd)

        out["save"] = synced(save)
        out["save: gather part"] = box["gather"]
        self._record_bytes("torch.save (gathered on rank 0)", path)
        out["load"] = synced(load)
        on_rank0(lambda: path.unlink(missing_ok=True))
        return out

    def raw_disk(self) -> dict[str, float]:
        """Write (fsync) and read back the bytes of our checkpoint, split evenly over the ranks."""
        n = self.raw_bytes // dist.get_world_size()
        path = self.root / f"raw.rank{dist.get_rank()}"
        buf = torch.randint(0, 256, (CHUNK,), dtype=torch.uint8).numpy().tobytes()

        def write() -> None:
            with open(path, "wb", buffering=0) as f:
                left = n
                while left > 0:
                    left -= f.write(buf[:min(left, CHUNK)])
                os.fsync(f.fileno())

        def read() -> None:
            with open(path, "rb", buffering=0) as f:
                while f.read(CHUNK):
                    pass

        out = {"save": synced(write), "load": synced(read)}
        self.bytes["raw disk (write + fsync, read)"] = n * dist.get_world_size()
        path.unlink(missing_ok=True)
        barrier()
        return out


def mode_bench(b: SimpleNamespace, reps: int, root: Path) -> dict[str, Any]:
    c = Contenders(b, root)
    on_rank0(lambda: root.mkdir(parents=True, exist_ok=True))
    # Untimed first save: sizes the raw-disk contender and warms the writer.
    path = b.ckpt.save()
    sizes = [dir_bytes(path)]
    dist.broadcast_object_list(sizes, src=0)
    c.raw_bytes = sizes[0]
    on_rank0(lambda: shutil.rmtree(b.ckpt.root, ignore_errors=True))
    runs = interleave({"ours: CheckpointManager": c.ours, "ours: bare DCP": c.bare_dcp,
                       "DeepSpeed save_checkpoint": c.deepspeed, "torch.save (gathered on rank 0)": c.torch_save,
                       "raw disk (write + fsync, read)": c.raw_disk}, reps)
    kept = b.ckpt.save()  # for sections 4 and 5
    return {"runs": runs, "bytes": c.bytes, "checkpoint": str(kept)}


def mode_load(b: SimpleNamespace, reps: int, ckpt_path: Path) -> dict[str, Any]:
    ckpt = b.ckpt
    first = synced(lambda: ckpt.load(ckpt_path))  # also materialises the fresh engine's optimizer states

    def load_verified() -> float:  # as a resume with checkpoint.verify: rank 0 checks the manifest first
        from moe_dist.checkpoint.manifest import verify_manifest

        def run() -> None:
            if dist.get_rank() == 0:
                verify_manifest(ckpt_path)
            barrier()
            ckpt.load(ckpt_path)

        return synced(run)

    def load_unverified() -> float:
        verify = ckpt.cfg.checkpoint.verify
        ckpt.cfg.checkpoint.verify = False
        try:
            return synced(lambda: ckpt.load(ckpt_path))
        finally:
            ckpt.cfg.checkpoint.verify = verify

    runs = interleave({"load": load_unverified, "load + checksum check": load_verified}, reps)
    return {"first_load": first, "runs": runs, "step": b.trainer.state.step}


def mode_stall(b: SimpleNamespace, baseline_steps: int, blocks: int, every: int, with_async: bool
               ) -> dict[str, Any]:
    """Time the training loop's body (step, metrics, checkpoint hooks) step by step.

    ``baseline_steps`` without checkpoints, then ``blocks`` blocks of ``every`` steps, each
    ending with a save; blocks alternate between a synchronous ``CheckpointManager`` and, with
    ``with_async``, a second manager on the same engine with ``checkpoint.async_save`` (its own
    output folder), so both run side by side under the same machine load. Every step calls
    every manager's ``after_step`` (periodic saving is off: saves are explicit), which lets an
    async save in flight be published as in ``Trainer.fit``.
    """
    from dataclasses import replace

    from moe_dist.checkpoint.manager import CheckpointManager

    managers = {"sync": b.ckpt}
    if with_async:
        cfg = replace(b.cfg, checkpoint=replace(b.cfg.checkpoint, async_save=True, save_every=0,
                                                output_dir=str(Path(b.cfg.checkpoint.output_dir) / "async")))
        managers["async"] = CheckpointManager(cfg, b.rt, b.engine, b.trainer, tokenizer_spec=b.ckpt.tokenizer_spec)
    b.cfg.checkpoint.save_every = 0
    modes = list(managers)
    rows: list[dict[str, Any]] = []

    def step(save_with: Optional[str]) -> None:
        t0 = time.perf_counter()
        record = b.trainer.train_step()
        if b.rt.is_main:
            b.metrics.write(record)
        t1 = time.perf_counter()
        for m in managers.values():
            m.after_step()
        if save_with is not None:
            managers[save_with].save()
        rows.append({"train_s": t1 - t0, "hook_s": time.perf_counter() - t1, "saved": save_with,
                     "phase": "baseline" if len(rows) < baseline_steps else "saving"})

    for _ in range(baseline_steps):
        step(None)
    for k in range(blocks):
        for i in range(every):
            step(modes[k % len(modes)] if i == every - 1 else None)
    for _ in range(2):  # let the last block's save be published inside the measured loop
        step(None)
    for m in managers.values():
        m.finish(interrupted=False)  # untimed: waits for a write still in flight (and saves the last step)
    logs = {}
    for mode, m in managers.items():
        log = Path(m.cfg.checkpoint.output_dir) / "checkpoint_log.jsonl"  # the manager's own stall records
        logs[mode] = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    return {"rows": rows, "modes": modes, "manager_log": logs, "checkpoint": str(b.ckpt.last_saved_path)}


def main() -> None:
    p = argparse.ArgumentParser(description="one rank of the checkpoint benchmarks")
    p.add_argument("--mode", required=True, help="bench, save, load, stall; chain with commas")
    p.add_argument("--size", required=True, choices=list(SIZES))
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="bench/save: training steps before saving")
    p.add_argument("--baseline-steps", type=int, default=6, help="stall: steps without checkpoints first")
    p.add_argument("--blocks", type=int, default=4, help="stall: blocks of --save-every steps, each ending in a save")
    p.add_argument("--ckpt", type=Path, help="checkpoint folder to load (mode load)")
    p.add_argument("--save-every", type=int, default=4, help="stall: steps per block")
    p.add_argument("--async-save", action="store_true", help="stall: alternate with an async-save manager")
    a = p.parse_args()
    modes = a.mode.split(",")
    b = build(a.size, a.work / "run", [])
    result: dict[str, Any] = {"size": a.size, "world_size": b.rt.world_size, "zero_stage": b.rt.zero_stage,
                              "optimizer": b.rt.optimizer_kind,
                              "params": b.local_params if b.cfg.parallel.ep_size == 1 else None}
    for mode in modes:
        if mode == "bench":
            train(b, a.steps)
            result["bench"] = mode_bench(b, a.reps, a.work / "contenders")
        elif mode == "save":
            train(b, a.steps)
            result["checkpoint"] = str(b.ckpt.save())
        elif mode == "load":
            result["load"] = mode_load(b, a.reps, a.ckpt)
        elif mode == "stall":
            result["stall"] = mode_stall(b, a.baseline_steps, a.blocks, a.save_every, a.async_save)
        else:
            raise SystemExit(f"--mode: unknown mode {mode!r}; use bench, save, load or stall")
    if dist.get_rank() == 0:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    from moe_dist.parallel.runtime import shutdown

    shutdown()


if __name__ == "__main__":
    main()
