"""Save and resume the whole training state through torch.distributed.checkpoint (DCP).

What a checkpoint holds:

* DCP shards (``*.distcp`` + ``.metadata``): fp32 master weights and optimizer states in the model's
  own shapes, as the boxes each rank owns (``dcp_state``), so DCP reshards them into any world
  size / ZeRO stage / EP degree; experts are keyed by their global index. No RNG state: every
  micro-batch reseeds from (seed, step, micro-batch), see ``trainer.micro_seed``.
* ``train_state.json``: format version, step, tokens, the global data cursor, LR schedule, config,
  tokenizer, metrics, topology. Plain JSON: nothing in it is ever unpickled.
* ``manifest.json``: sizes and checksums (XXH3-128) of every file, written last (see ``manifest``).

Saving is atomic (``layout``): shards go to a temp folder that is renamed into place only when
complete, then ``checkpoint_latest`` moves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from ..logging_utils import get_logger
from . import layout
from .async_writer import AsyncCheckpointWriter
from .audit import audit_experts
from .errors import CheckpointError, CheckpointWriteError
from .reasons import SHORT_WRITE, reason as _reason
from .finite import MANIFEST_FIELD as FINITE_FIELD, first_nonfinite
from .keys import FORMAT_VERSION
from .manifest import config_hash, own_shard_entries, without_zip_crc32, write_manifest
from .reader import CheckpointReader, read_train_state
from .resume import choose_resume
from .dcp_state import EngineCheckpoint, read_saved_keys

FAULT_ENV = "MOE_DIST_FAULT"  # test hook: kill this process (SIGKILL) at a named point of a save
FAULT_STEP_ENV = "MOE_DIST_FAULT_STEP"  # ... only at this optimizer step
FAULT_ACTION_ENV = "MOE_DIST_FAULT_ACTION"  # "hang": stop there (until killed); "sigstop": SIGSTOP itself


def fault_point(name: str, step: Optional[int] = None) -> None:
    """Die here if the test harness asked for it: ``MOE_DIST_FAULT=<name>[@rank]``, optionally
    ``MOE_DIST_FAULT_STEP=<step>``. Points: ``after_step`` (every step, before its save), then, in
    a save, ``before_shards``, ``before_metadata``, ``after_metadata``, ``before_publish``,
    ``before_latest``, ``after_latest``, and ``between_renames`` (only when a step is saved again,
    replacing its folder). Under torchrun only the first attempt dies, so a restarted
    job can show that it recovers. ``MOE_DIST_FAULT_ACTION=hang`` holds the process at the point
    instead (one line on stderr says so), for a test that kills the launcher there."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return
    target, _, rank = spec.partition("@")
    at_step = os.environ.get(FAULT_STEP_ENV)
    if at_step and step is not None and int(at_step) != step:
        return
    if target == name and (not rank or int(rank) == (dist.get_rank() if dist.is_initialized() else 0)):
        if os.environ.get(FAULT_ACTION_ENV) == "sigstop":  # frozen whole, every thread: a wedged rank
            print(f"[moe_dist] fault point {name}: stopping this process (SIGSTOP)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        if os.environ.get(FAULT_ACTION_ENV) == "hang":
            print(f"[moe_dist] fault point {name}: holding here until killed", file=sys.stderr, flush=True)
            while True:
                time.sleep(60)
        os.kill(os.getpid(), signal.SIGKILL)


class _FaultingWriter(FileSystemWriter):
    """FileSystemWriter whose ``finish`` (DCP's metadata write) can be interrupted by a fault point, and
    whose shard writes skip torch.save's zip CRC-32 (the manifest checksums them: ``without_zip_crc32``)."""

    def __init__(self, path: str, step: int, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.step = step

    def write_data(self, plan, planner):  # noqa: ANN001 - DCP signature
        with without_zip_crc32():  # the manifest checksums the shards; thread_count=1: written before returning
            return super().write_data(plan, planner)

    def finish(self, metadata, results):  # noqa: ANN001 - DCP signature
        fault_point("before_metadata", self.step)
        super().finish(metadata, results)
        fault_point("after_metadata", self.step)


def _engine_label(topo: dict[str, Any]) -> str:
    """``ZeRO-2`` or ``FSDP2`` from a saved topology record (older records name no engine: DeepSpeed)."""
    if topo.get("engine", "deepspeed") == "deepspeed":
        return f"ZeRO-{topo.get('zero_stage')}"
    return str(topo["engine"]).upper()


class CheckpointManager:
    def __init__(self, cfg, rt, engine, trainer, tokenizer_spec: dict[str, Any]) -> None:  # noqa: ANN001
        self.cfg, self.rt, self.engine, self.trainer = cfg, rt, engine, trainer
        self.tokenizer_spec = tokenizer_spec
        self.root = layout.checkpoints_dir(cfg.checkpoint.output_dir)
        self.log = get_logger()
        # A gloo group of its own keeps checkpoint traffic off the training group (and works for
        # async saves, whose collectives run from a background thread).
        self.pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.last_saved_step: Optional[int] = None
        self.last_saved_path: Optional[Path] = None
        self.save_seconds: list[float] = []
        # Per-step votes (stop requested? background save finished?) travel on a control group of
        # their own: with --async-save, DCP's writer thread runs collectives on self.pg, and two
        # threads issuing collectives on one gloo group deadlock (seen: a hang at the second save).
        self.ctrl_pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.writer: Optional[AsyncCheckpointWriter] = None
        if cfg.checkpoint.async_save:
            self.writer = AsyncCheckpointWriter(self.pg, self.ctrl_pg)

    # ------------------------------------------------------------------ helpers
    def _barrier(self) -> None:
        if self.pg is not None:
            dist.barrier(group=self.pg)

    def _broadcast(self, obj: Any) -> Any:
        if self.pg is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def stop_requested(self, local_flag: bool) -> bool:
        """A signal reaches some ranks only: agree on stopping so every rank saves together."""
        if self.ctrl_pg is None:
            return local_flag
        t = torch.tensor([1 if local_flag else 0], device="cpu")  # host value on a gloo group
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctrl_pg)
        return bool(t.item())

    def _train_state(self) -> dict[str, Any]:
        tr = self.trainer
        hist = tr.metrics.history
        return {
            "format_version": FORMAT_VERSION, "step": tr.state.step, "tokens": tr.state.tokens, "trainer": tr.state.state_dict(),
            "sampler": tr.sampler.state_dict(), "lr_schedule": tr.schedule.state_dict(),
            "config": self.cfg.to_dict(), "tokenizer": self.tokenizer_spec, "data": tr.data.fingerprint,
            "metrics": {"last": hist[-1] if hist else None, "history": hist[-200:]},
            "topology": {"world_size": self.rt.world_size, "engine": self.rt.engine,
                         "zero_stage": self.rt.zero_stage,
                         "ep_size": self.cfg.parallel.ep_size, "optimizer": self.rt.optimizer_kind},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
        }

    def state_dict_for_save(self) -> dict[str, Any]:
        return EngineCheckpoint(self.engine, self.pg).for_save()

    # ------------------------------------------------------------------ save
    def save(self) -> Path:
        """Write ``checkpoint_step_<N>`` atomically (in the background with ``--async-save``).

        A failure on any rank (full disk, read-only folder, ...) raises the same CheckpointError on
        every rank, after the temp folder is removed: the previous checkpoint and
        ``checkpoint_latest`` are never touched by a failed save.
        """
        if self.writer is not None:
            self.writer.wait()  # at most one save in flight
        step = self.trainer.state.step
        t0 = time.perf_counter()
        refused = self._unfit_to_save()
        if refused is not None:
            kept = self.last_saved_path.name if self.last_saved_path else "no checkpoint"
            self.log.warning(f"not saving checkpoint_step_{step}: {refused}; {kept} stays the newest")
            return self.last_saved_path
        self._refuse_if_vanished(step)
        token = self._broadcast(f"{int(time.time())}-{os.getpid()}")
        tmp = layout.tmp_dir_for(self.root, step, token)
        final = self.root / layout.step_dir_name(step)
        err = None
        if self.rt.is_main:
            for old in layout.leftovers(self.root):
                self.log.info(f"removing {old.name}, left by an interrupted save")
                shutil.rmtree(old, ignore_errors=True)
            try:
                tmp.mkdir(parents=True, exist_ok=False)
            except OSError as e:
                err = _reason(e)
        err = self._broadcast(err)
        if err is not None:
            return self._publish(step, tmp, final, None, err, t0, t0)
        state = self._train_state() if self.rt.is_main else None  # snapshot now: training moves on
        sd = self.state_dict_for_save()
        fault_point("before_shards", step)
        writer = _FaultingWriter(str(tmp), step, sync_files=True)
        if self.writer is not None:
            self.writer.start(sd, writer, step,
                              lambda e, own: self._publish(step, tmp, final, state, None if e is None else _reason(e),
                                                           t0, stall, own),
                              after_write=lambda: own_shard_entries(tmp, self._group_rank()))
            stall = time.perf_counter() - t0  # read by the lambda when the write completes
            self.log.info(f"checkpoint_step_{step}: shards staged in {stall:.2f}s, writing in the background")
            return final
        try:
            dcp.save(sd, storage_writer=writer, process_group=self.pg)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises it on every rank
            err = _reason(e)
        return self._publish(step, tmp, final, state, err, t0, time.perf_counter() - t0)

    def _refuse_if_vanished(self, step: int) -> None:
        """A checkpoint this run saved (or resumed) is gone, or its whole folder: say so rather than
        recreate the folder and carry on as if nothing happened (collective)."""
        gone = None
        if self.rt.is_main and self.last_saved_path is not None and not self.last_saved_path.is_dir():
            what = self.root if not self.root.is_dir() else self.last_saved_path
            gone = (f"{what} vanished during the run (it held {self.last_saved_path.name}, saved or resumed by this "
                    f"run); checkpoint_step_{step} was not saved and the folder not recreated: restore it, or "
                    "rerun with --resume auto to continue from what is left")
        gone = self._broadcast(gone)
        if gone is not None:
            raise CheckpointWriteError(gone)

    def _unfit_to_save(self) -> Optional[str]:
        """Why this state must not become a checkpoint (non-finite), or None; collective over the checkpoint group."""
        guard = getattr(self.trainer, "guard", None)
        if guard is not None and not guard.healthy:  # every rank alike: judged from reduced values
            return f"the last {guard.streak} step(s) had a non-finite loss or gradient norm"
        bad = first_nonfinite(self.engine.checkpoint_fragments(), self.pg)
        return f"non-finite values (NaN or inf) in {bad}" if bad is not None else None

    def _group_rank(self) -> int:
        """This rank's index in the checkpoint group: DCP names its shard files after it."""
        return dist.get_rank(self.pg) if self.pg is not None else 0

    def _publish(self, step: int, tmp: Path, final: Path, state: Optional[dict[str, Any]], err: Optional[str],
                 t0: float, stall: float, own: Optional[dict[str, Any]] = None) -> Path:
        """After every rank's shards are written: manifest (each rank hashed its own shards: ``own``,
        computed here for a synchronous save, on the writer thread for an async one), audit, rename,
        pointer (rank 0)."""
        if err is None and own is None:
            try:
                own = own_shard_entries(tmp, self._group_rank())
            except OSError as e:
                err = _reason(e)
        reports: list[Any] = [(err, own)]
        if self.pg is not None:
            reports = [None] * dist.get_world_size(self.pg)
            dist.all_gather_object(reports, (err, own), group=self.pg)  # also the barrier: all shards are durable
        err = next((e for e, _ in reports if e), None)
        hashed = {name: entry for _, entries in reports for name, entry in (entries or {}).items()}
        if err is None and self.rt.is_main:
            try:
                assert state is not None
                layout.write_file_atomic(tmp / layout.TRAIN_STATE, json.dumps(state, indent=1).encode())
                audit_experts(tmp, self.cfg.model)
                write_manifest(tmp, {"step": step, "tokens": state["tokens"], "topology": state["topology"],
                                     "model_config_hash": config_hash(state["config"]["model"]),
                                     FINITE_FIELD: True},  # scanned in save() before writing
                               precomputed=hashed)
                fault_point("before_publish", step)
                layout.publish(tmp, final, between_renames=lambda: fault_point("between_renames", step))
                fault_point("before_latest", step)
                layout.point_latest(self.root, final)
                fault_point("after_latest", step)
            except (OSError, CheckpointError) as e:
                err = _reason(e) if isinstance(e, OSError) else str(e)
        err = self._broadcast(err)
        if err is not None:
            if "No space" in err or SHORT_WRITE in err:
                try:
                    err += f"; {shutil.disk_usage(self.root).free / 2**20:.1f} MiB free there"
                except OSError:
                    pass
            if self.rt.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = f"{self.last_saved_path.name} and {layout.LATEST}" if self.last_saved_path else "earlier checkpoints"
            raise CheckpointWriteError(f"saving checkpoint_step_{step} in {self.root} failed: {err}; nothing was "
                                       f"published, {kept} are untouched")
        if self.rt.is_main:
            for removed in layout.prune(self.root, self.cfg.checkpoint.keep_last, protect=final):
                self.log.info(f"pruned {removed.name}")
        self._barrier()
        self.last_saved_step, self.last_saved_path = step, final
        total = time.perf_counter() - t0
        self.save_seconds.append(total)
        if self.rt.is_main:
            size = sum(p.stat().st_size for p in final.iterdir() if p.is_file())
            with open(self.root.parent / "checkpoint_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "mode": "async" if self.writer is not None else "sync",
                                    "stall_s": stall, "total_s": total, "bytes": size}) + "\n")
        self.log.info(f"saved {final} in {total:.2f}s (training stalled {stall:.2f}s)")
        return final

    def after_step(self) -> None:
        fault_point("after_step", self.trainer.state.step)
        if self.writer is not None:
            self.writer.poll()  # publish a finished background save promptly
        every = self.cfg.checkpoint.save_every
        if every and self.trainer.state.step % every == 0:
            self.save()

    def finish(self, interrupted: bool) -> Optional[Path]:
        """Final save at the end of training or on SIGTERM/Ctrl-C (unless this step is saved already)."""
        if interrupted:
            self.log.warning(f"stop requested: saving at step {self.trainer.state.step} before exiting")
        if self.writer is not None:
            self.writer.wait()
        if self.trainer.state.step > 0 and self.last_saved_step != self.trainer.state.step:
            self.save()
            if self.writer is not None:
                self.writer.wait()
        return self.last_saved_path

    # ------------------------------------------------------------------ resume
    def maybe_resume(self) -> Optional[Path]:
        """Pick the checkpoint (rank 0 runs the checksums and, for ``auto``, any fallback), then load it."""
        if not self.cfg.checkpoint.resume:
            return None
        unfinished = layout.leftovers(self.root)
        if unfinished:
            self.log.info(f"ignoring {len(unfinished)} unfinished save(s) ({', '.join(p.name for p in unfinished)}), "
                          "left by an interrupted run; they are removed at the next save")
        if self.rt.is_main:
            for line in layout.finish_interrupted_publish(self.root):
                self.log.warning(line)
        exclude: list[Path] = []  # loaded, found non-finite: --resume auto falls back past them
        while True:
            choice: tuple[Optional[str], Optional[str]] = (None, None)  # (path, error)
            if self.rt.is_main:
                try:
                    path = choose_resume(self.cfg, checksums=self.cfg.checkpoint.verify, warn=self.log.warning,
                                         exclude=exclude)
                    choice = (str(path) if path is not None else None, None)
                except CheckpointError as e:
                    choice = (None, str(e))
                except OSError as e:
                    choice = (None, f"cannot read the checkpoint ({_reason(e)})")
            found, err = self._broadcast(choice)
            if err:
                raise CheckpointError(err)
            if found is None and exclude:
                raise CheckpointError(f"--resume auto: every checkpoint under {self.root} holds non-finite values "
                                      f"({', '.join(p.name for p in exclude)}); start a new run")
            if found is None:
                self.log.info(f"--resume auto: no complete checkpoint under {self.root}; starting fresh")
                return None
            self.load(Path(found))
            bad = first_nonfinite(self.engine.checkpoint_fragments(), self.pg)
            if bad is None:
                return Path(found)
            reason = f"{found}: non-finite values (NaN or inf) in {bad}"
            if self.cfg.checkpoint.resume != "auto":
                raise CheckpointError(f"{reason}; resume from an earlier checkpoint")
            self.log.warning(f"--resume auto: skipping {reason}; trying the next older one")
            exclude.append(Path(found))

    def load(self, path: Path) -> None:
        """Load a checkpoint that :func:`choose_resume` accepted into the engine, trainer and sampler."""
        t0 = time.perf_counter()
        saved = read_train_state(path)
        # one reader for the key check and the load: the .metadata pickle is parsed once, through an
        # allow-list, never trusted
        reader = CheckpointReader(path)
        states = EngineCheckpoint(self.engine, self.pg, saved=read_saved_keys(str(path), reader)).for_load()
        try:
            dcp.load(states, storage_reader=reader, process_group=self.pg)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises it on every rank
            raise CheckpointError(f"{path}: cannot load the shards ({_reason(e)}); check it with "
                                  f"`moe-ckpt verify {path}` or resume from another checkpoint") from None
        topo = saved["topology"]
        self.trainer.state.load_state_dict(saved["trainer"])
        if not saved["sampler"].get("fresh"):  # an imported checkpoint (moe-ckpt import-seed) has no data cursor
            self.trainer.sampler.load_state_dict(saved["sampler"])
        self.trainer.metrics.history[:] = [r for r in saved["metrics"]["history"] if r["step"] <= saved["step"]]
        self.last_saved_step, self.last_saved_path = saved["step"], path
        self.log.info(f"resumed from {path} at step {saved['step']} in {time.perf_counter() - t0:.2f}s "
                      f"(saved on world {topo['world_size']}, "
                      f"{_engine_label(topo)}, EP {topo['ep_size']}; now world {self.rt.world_size}, "
                      f"{self.rt.engine_label}, EP {self.cfg.parallel.ep_size})")
