"""Save and resume the whole training state through torch.distributed.checkpoint (DCP).

What a checkpoint holds:

* DCP shards (``*.distcp`` + ``.metadata``): fp32 master weights and optimizer states as the ZeRO
  fragments each rank owns, with their global offsets (``zero_state``), so DCP reshards them into
  any world size / ZeRO stage / EP degree; experts are keyed by their global index; each rank's
  RNG state under its own key.
* ``train_state.json``: step, tokens, the global data cursor, LR schedule, config, tokenizer,
  metrics, topology. Plain JSON: nothing in it is ever unpickled.
* ``manifest.json``: sizes and SHA-256 of every file, written last (see ``manifest``).

Saving is atomic (``layout``): shards go to a temp folder that is renamed into place only when
complete, then ``checkpoint_latest`` moves.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from ..config import architecture_diff
from ..logging_utils import get_logger, warn_once
from . import layout
from .audit import audit_experts
from .errors import CheckpointError
from .manifest import config_hash, verify_manifest, write_manifest
from .zero_state import load_zero_state_dict, zero_load_template, zero_state_dict

FAULT_ENV = "MOE_DIST_FAULT"  # test hook: kill this process (SIGKILL) at a named point of a save
TRAINING_ONLY_MODEL_FIELDS = ("router_noise_std", "load_balancing_weight", "init_std")


def fault_point(name: str) -> None:
    """Die here if the test harness asked for it (``MOE_DIST_FAULT=<name>[@rank]``)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, rank = spec.partition("@")
    if target == name and (not rank or int(rank) == (dist.get_rank() if dist.is_initialized() else 0)):
        os.kill(os.getpid(), signal.SIGKILL)


class _FaultingWriter(FileSystemWriter):
    """FileSystemWriter whose ``finish`` (DCP's metadata write) can be interrupted by a fault point."""

    def finish(self, metadata, results):  # noqa: ANN001 - DCP signature
        fault_point("before_metadata")
        super().finish(metadata, results)
        fault_point("after_metadata")


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

    def _key_fn(self, name: str) -> str:
        return name

    def stop_requested(self, local_flag: bool) -> bool:
        """A signal reaches some ranks only: agree on stopping so every rank saves together."""
        if self.pg is None:
            return local_flag
        t = torch.tensor([1 if local_flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
        return bool(t.item())

    def _train_state(self) -> dict[str, Any]:
        tr = self.trainer
        hist = tr.metrics.history
        return {
            "step": tr.state.step, "tokens": tr.state.tokens, "trainer": tr.state.state_dict(),
            "sampler": tr.sampler.state_dict(), "lr_schedule": tr.schedule.state_dict(),
            "config": self.cfg.to_dict(), "tokenizer": self.tokenizer_spec,
            "metrics": {"last": hist[-1] if hist else None, "history": hist[-200:]},
            "topology": {"world_size": self.rt.world_size, "zero_stage": self.rt.zero_stage,
                         "ep_size": self.cfg.parallel.ep_size, "optimizer": self.rt.optimizer_kind},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
        }

    def state_dict_for_save(self) -> dict[str, Any]:
        sd = zero_state_dict(self.engine, self._key_fn)
        sd[f"rng.rank{self.rt.rank}.torch"] = torch.get_rng_state()
        return sd

    # ------------------------------------------------------------------ save
    def save(self) -> Path:
        step = self.trainer.state.step
        t0 = time.perf_counter()
        token = self._broadcast(f"{int(time.time())}-{os.getpid()}")
        tmp = layout.tmp_dir_for(self.root, step, token)
        if self.rt.is_main:
            for old in layout.leftovers(self.root):
                self.log.info(f"removing {old.name}, left by an interrupted save")
                import shutil

                shutil.rmtree(old, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=False)
        self._barrier()
        sd = self.state_dict_for_save()
        fault_point("before_shards")
        dcp.save(sd, storage_writer=_FaultingWriter(str(tmp), sync_files=True), process_group=self.pg)
        self._barrier()  # every rank's shards are durable, rank 0 wrote .metadata
        final = self.root / layout.step_dir_name(step)
        if self.rt.is_main:
            state = self._train_state()
            layout.write_file_atomic(tmp / layout.TRAIN_STATE, json.dumps(state, indent=1).encode())
            audit_experts(tmp, self.cfg.model)
            write_manifest(tmp, {"step": step, "tokens": state["tokens"], "topology": state["topology"],
                                 "model_config_hash": config_hash(state["config"]["model"])})
            fault_point("before_publish")
            layout.publish(tmp, final)
            fault_point("before_latest")
            layout.point_latest(self.root, final)
            fault_point("after_latest")
            for removed in layout.prune(self.root, self.cfg.checkpoint.keep_last, protect=final):
                self.log.info(f"pruned {removed.name}")
        self._barrier()
        self.last_saved_step, self.last_saved_path = step, final
        self.save_seconds.append(time.perf_counter() - t0)
        self.log.info(f"saved {final} in {self.save_seconds[-1]:.2f}s")
        return final

    def after_step(self) -> None:
        every = self.cfg.checkpoint.save_every
        if every and self.trainer.state.step % every == 0:
            self.save()

    def finish(self, interrupted: bool) -> Optional[Path]:
        """Final save at the end of training or on SIGTERM/Ctrl-C (unless this step is saved already)."""
        if interrupted:
            self.log.warning(f"stop requested: saving at step {self.trainer.state.step} before exiting")
        if self.trainer.state.step > 0 and self.last_saved_step != self.trainer.state.step:
            return self.save()
        return self.last_saved_path

    # ------------------------------------------------------------------ resume
    def maybe_resume(self) -> Optional[Path]:
        spec = self.cfg.checkpoint.resume
        if not spec:
            return None
        path = layout.resolve_resume(spec, self.cfg.checkpoint.output_dir)
        if path is None:
            self.log.info(f"--resume auto: no complete checkpoint under {self.root}; starting fresh")
            return None
        self.load(path)
        return path

    def load(self, path: Path) -> None:
        err = None
        if self.rt.is_main:
            try:
                if self.cfg.checkpoint.verify:
                    verify_manifest(path)
                saved = json.loads((path / layout.TRAIN_STATE).read_text())
                self._check_compatible(path, saved)
            except CheckpointError as e:
                err = str(e)
            except (OSError, json.JSONDecodeError, KeyError) as e:
                err = f"{path}: unreadable checkpoint ({e.__class__.__name__}: {e})"
        err = self._broadcast(err)
        if err:
            raise CheckpointError(err)
        saved = json.loads((path / layout.TRAIN_STATE).read_text())
        template = zero_load_template(self.engine, self._key_fn, checkpoint_path=str(path))
        topo = saved["topology"]
        same_topology = topo["world_size"] == self.rt.world_size
        rng_key = f"rng.rank{self.rt.rank}.torch"
        if same_topology:
            template[rng_key] = torch.get_rng_state()
        dcp.load(template, storage_reader=FileSystemReader(str(path)), process_group=self.pg)
        load_zero_state_dict(self.engine, template)
        if same_topology:
            torch.set_rng_state(template[rng_key])
        else:
            warn_once(f"resuming a world-{topo['world_size']} checkpoint on world {self.rt.world_size}: RNG streams "
                      "are derived from (seed, step, rank) instead of restored")
        self.trainer.state.load_state_dict(saved["trainer"])
        self.trainer.sampler.load_state_dict(saved["sampler"])
        self.trainer.metrics.history[:] = [r for r in saved["metrics"]["history"] if r["step"] <= saved["step"]]
        self.last_saved_step, self.last_saved_path = saved["step"], path
        self.log.info(f"resumed from {path} at step {saved['step']} (saved on world {topo['world_size']}, "
                      f"ZeRO-{topo['zero_stage']}, EP {topo['ep_size']}; now world {self.rt.world_size}, "
                      f"ZeRO-{self.rt.zero_stage}, EP {self.cfg.parallel.ep_size})")

    def _check_compatible(self, path: Path, saved: dict[str, Any]) -> None:
        saved_model = dict(saved["config"]["model"])
        from dataclasses import replace

        requested = replace(self.cfg.model, **{k: saved_model[k] for k in TRAINING_ONLY_MODEL_FIELDS
                                                if k in saved_model})
        diffs = architecture_diff(saved_model, requested)
        if diffs:
            raise CheckpointError(f"{path}: checkpoint of another architecture; differing fields: "
                                  + "; ".join(diffs) + ". Use the saved values or start a new run.")
        g_saved = saved["sampler"]["global_batch_size"]
        if g_saved != self.cfg.train.global_batch_size:
            raise CheckpointError(f"{path}: saved with train.global_batch_size={g_saved}, requested "
                                  f"{self.cfg.train.global_batch_size}; the data cursor counts global batches, "
                                  "so resume with the saved value")
