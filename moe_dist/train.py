"""Entry point: ``accelerate launch [--config_file launch_configs/cpu.yaml] moe_dist/train.py ...``.

Also installed as ``moe-train``. Examples::

    accelerate launch --config_file launch_configs/cpu.yaml moe_dist/train.py --preset tiny \
        --max-steps 20 --output-dir runs/demo
    accelerate launch --config_file launch_configs/cpu.yaml --num_processes 4 moe_dist/train.py \
        --preset tiny --ep-size 2 --zero-stage 1 --output-dir runs/ep
    moe-train --preset 18b --print-params

Build, loop, close: the pieces live in config/cli (what to run), parallel/ (how it is spread),
data/ (what it reads), trainer (the loop) and checkpoint/ (what survives).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script by `accelerate launch moe_dist/train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contextlib import ExitStack  # noqa: E402
from typing import Optional  # noqa: E402


def _fail(msg: str, code: int = 2, every_rank: bool = False) -> int:
    """One line on stderr, from rank 0 (errors every rank sees alike) or ``every_rank`` (local ones)."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"error: {msg}", file=sys.stderr)
    elif every_rank:
        print(f"error (rank {rank}): {msg}", file=sys.stderr)
    return code


def _check_output_dir(path: str) -> None:
    """Create the run folder and prove it takes a file, before minutes go into building the model."""
    from moe_dist.config import ConfigError

    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"checkpoint.output_dir {path}: is a file, not a folder; pass a folder to --output-dir")
    probe = os.path.join(path, f".write_test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"checkpoint.output_dir {path}: cannot write there ({e.strerror}); "
                          "pass a writable --output-dir") from None


def run(argv: Optional[list[str]] = None) -> int:
    from moe_dist.cli import config_help_text, parse
    from moe_dist.config import ConfigError

    try:
        args, cfg = parse(argv)
    except ConfigError as e:
        return _fail(str(e))
    if args.help_config:
        print(config_help_text())
        return 0
    if args.print_params:
        from moe_dist.model import count_parameters

        total, active = count_parameters(cfg.model)
        print(f"preset {cfg.preset}: total {total:,} parameters ({total / 1e9:.2f}B), "
              f"active per token {active:,} ({active / 1e9:.2f}B)")
        return 0

    from moe_dist.checkpoint.errors import CheckpointError
    from moe_dist.data import DataError
    from moe_dist.parallel.runtime import shutdown
    from moe_dist.run_lock import RunFolderBusy

    try:
        with ExitStack() as held:  # the run folder's lock, released before the process group goes
            return _train(cfg, args, held)
    except (ConfigError, DataError, CheckpointError, RunFolderBusy) as e:
        return _fail(str(e))
    except OSError as e:  # the machine, not the code: a full disk, a file removed under us
        where = f": {e.filename}" if e.filename else ""
        return _fail(f"{e.strerror or e}{where}", every_rank=True)
    finally:
        shutdown()


def _train(cfg, args, held: ExitStack) -> int:  # noqa: ANN001 - internal
    import signal

    from moe_dist.checkpoint.manager import CheckpointManager
    from moe_dist.checkpoint.reader import read_train_state
    from moe_dist.checkpoint.resume import preflight_resume
    from moe_dist.config import ConfigError
    from moe_dist.data.loader import build_data, check_same_data
    from moe_dist.data.sampler import GlobalCursorSampler
    from moe_dist.debug import dump_probe_logits_from_env, grad_dump_probe_from_env, strict_device_from_env
    from moe_dist.metrics import MetricsLog
    from moe_dist.model import count_parameters
    from moe_dist.parallel.expert_parallel import validate_ep
    from moe_dist.parallel.runtime import build_engine, init_runtime
    from moe_dist.run_lock import hold_run_folder
    from moe_dist.trainer import Trainer
    from moe_dist.ui import TrainUI

    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_ep(cfg, world)
    _check_output_dir(cfg.checkpoint.output_dir)
    rt = init_runtime(cfg, args.deepspeed_config)
    # One live writer per folder: a second run stops here, on every rank, before it reads the folder.
    lock = hold_run_folder(cfg.checkpoint.output_dir, rt.rank)
    if lock is not None:
        held.callback(lock.release)
    resume_path = preflight_resume(cfg)  # a wrong --resume fails now, not after the engine is built
    data = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed)
    if resume_path is not None:  # ... and so does other data
        saved_data = read_train_state(resume_path).get("data")
        check_same_data(saved_data, data.fingerprint_like(saved_data), str(resume_path))
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({data.tokenizer.vocab_size}); set --set model.vocab_size={data.tokenizer.vocab_size}")
    _, engine = build_engine(rt, cfg)
    strict_device_from_env()  # tests: from here on an implicit device is an error (see moe_dist.debug)

    sampler = GlobalCursorSampler(len(data.train_blocks), cfg.train.global_batch_size, cfg.train.seed)
    metrics = MetricsLog(os.path.join(cfg.checkpoint.output_dir, "metrics.jsonl"), enabled=rt.is_main)
    trainer = Trainer(cfg, rt, engine, data, sampler, metrics)
    trainer.grad_probe = grad_dump_probe_from_env(rt.rank)
    ckpt = CheckpointManager(cfg, rt, engine, trainer, tokenizer_spec=data.tokenizer.to_spec())
    resumed_from = ckpt.maybe_resume()
    if cfg.checkpoint.resume:  # rows after the resumed step (all of them on a fresh start) come again
        metrics.truncate_after(trainer.state.step)

    stop = {"flag": False}

    def _on_signal(signum, frame):  # noqa: ANN001
        stop["flag"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)

    total, active = count_parameters(cfg.model)
    with TrainUI(rt.is_main, cfg.train.max_steps, trainer.state.step, cfg.train.log_every) as ui:
        ui.print(f"[bold]moe_dist[/] preset {cfg.preset}: {total / 1e6:.1f}M params ({active / 1e6:.1f}M active), "
                 f"world {rt.world_size}, ZeRO-{rt.zero_stage}, EP {cfg.parallel.ep_size}, "
                 f"optimizer {rt.optimizer_kind}, {str(next(engine.module.parameters()).dtype).removeprefix('torch.')}"
                 + (f", resumed from {resumed_from} at step {trainer.state.step}" if resumed_from else ""))
        stop_at = cfg.checkpoint.stop_at_step
        trainer.fit(on_step=ui.on_step, after_step=ckpt.after_step,
                    should_stop=lambda: ckpt.stop_requested(stop["flag"])
                    or (stop_at is not None and trainer.state.step >= stop_at))
        saved = ckpt.finish(interrupted=stop["flag"])
        dump_probe_logits_from_env(engine, data, rt.rank)
        ui.summary(metrics.history, {"world size": rt.world_size, "ZeRO stage": rt.zero_stage,
                                     "EP size": cfg.parallel.ep_size,
                                     "checkpoint": saved or "-"})
    return 0


def main() -> None:
    from moe_dist.parallel.launcher_guard import die_with_launcher

    die_with_launcher()  # first: an orphan of a dead torchrun/accelerate agent must not train or save
    code = run()
    # DeepSpeed's ZeRO-3 (with or without offload) can abort in C++ static destructors at interpreter
    # exit ("terminate called without an active exception") even after the process group is destroyed,
    # turning a finished run into a crash. Everything is saved and flushed by now: leave directly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
