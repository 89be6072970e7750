"""Entry point: ``accelerate launch [--config_file launch_configs/cpu.yaml] moe_dist/train.py ...``.

Also installed as ``moe-train``. Examples::

    accelerate launch --config_file launch_configs/cpu.yaml moe_dist/train.py --preset tiny \
        --max-steps 20 --output-dir runs/demo
    accelerate launch --config_file launch_configs/cpu.yaml --num_processes 4 moe_dist/train.py \
        --preset tiny --ep-size 2 --zero-stage 1 --output-dir runs/ep
    moe-train --preset 18b --print-params

Build, loop, close: the pieces live in config/ and run/cli (what to run), parallel/ (how it is spread),
data/ (what it reads), run/trainer (the loop) and checkpoint/ (what survives).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script by `accelerate launch moe_dist/train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contextlib import ExitStack  # noqa: E402
from typing import Any, Optional  # noqa: E402

from moe_dist import exit_codes  # noqa: E402 - every exit status, documented there

PREEMPTED_EXIT_CODE = exit_codes.PREEMPTED


# How long a rank other than 0 waits before it reports a start-up error and exits. Launchers
# (torchrun, accelerate launch) kill every rank as soon as one exits: were rank 1 to exit first,
# rank 0 would be killed before it printed. Rank 0 reports at once; the others only if still alive
# after this, so the line shows once when every rank finds the error, and still shows when only
# rank k does.
PEER_GRACE_S = 3.0


def _process_group_up() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported yet: certainly not initialised
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _fail(msg: str, code: int = 2, every_rank: bool = False) -> int:
    """Report ``msg`` as one ``error:`` line on stderr and return ``code``.

    Once the process group is up, an error every rank raises alike (a failed save) is printed by
    rank 0 only: the ranks meet at the barrier in ``shutdown`` before any exits. Before that, every
    rank reports (see ``PEER_GRACE_S``). ``every_rank``: an error of this rank only (a full disk),
    labelled with the rank, printed wherever it happens."""
    import time

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 and not every_rank and _process_group_up():
        return code
    if rank != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(PEER_GRACE_S)
    label = f"error (rank {rank})" if every_rank and rank != 0 else "error"
    print(f"{label}: {msg}", file=sys.stderr, flush=True)
    from moe_dist.run.launcher_report import record_for_launcher

    record_for_launcher(f"{label}: {msg}")  # the launcher's failure summary ends with it
    return code


def _short(n: int) -> str:
    """1.2M / 18.63B: a parameter count at the scale it is read at."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


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
        kind = exit_codes.InfraError if exit_codes.is_infra(e) else ConfigError  # read-only, full: the machine's
        raise kind(f"checkpoint.output_dir {path}: cannot write there ({e.strerror}); "
                   "pass a writable --output-dir") from None


def run(argv: Optional[list[str]] = None) -> int:
    from moe_dist.run.cli import config_help_text, parse
    from moe_dist.config import ConfigError

    try:
        args, cfg = parse(argv)
    except ConfigError as e:
        return _fail(str(e))
    if args.help_config:
        print(config_help_text(cfg))
        return 0
    if args.print_params:
        from moe_dist.plan.param_counts import count_params

        pc = count_params(cfg.model)
        total, active = pc.total, pc.active
        print(f"preset {cfg.preset}: total {total:,} parameters ({_short(total)}), "
              f"active per token {active:,} ({_short(active)})")
        return 0

    from moe_dist.run.quiet import quiet_console
    from moe_dist.run.threads import set_plain_run_threads

    quiet_console(args.verbose)  # before DeepSpeed and Accelerate are imported

    threads = set_plain_run_threads()  # a plain one-process run: before torch is imported; said once it starts
    from moe_dist.checkpoint.errors import CheckpointError
    from moe_dist.data.errors import DataError
    from moe_dist.run.preflight import preflight, remove_if_left_empty

    try:  # every mistake of the command line or its files, before anything is started or created
        preflight(cfg, args)
    except exit_codes.InfraError as e:  # a read-only mount: every rank sees it alike
        return _fail(str(e), exit_codes.INFRA)
    except (ConfigError, DataError, CheckpointError) as e:
        return _fail(str(e))
    if threads:
        print(threads, flush=True)
    from moe_dist.parallel.runtime import shutdown
    from moe_dist.run.guard import Diverged
    from moe_dist.run.lock import RunFolderBusy

    fresh = not os.path.exists(cfg.checkpoint.output_dir)
    alone = False  # a fault of this rank only: no barrier on the way out (its peers wait elsewhere)
    try:
        with ExitStack() as held:  # the run folder's lock, released before the process group goes
            return _train(cfg, args, held)
    except Diverged as e:  # every rank alike (judged from reduced values): rank 0 prints
        return _fail(str(e), exit_codes.DIVERGED)
    except exit_codes.InfraError as e:  # a failed save (every rank alike), a store cut short (this rank)
        alone = not isinstance(e, CheckpointError)
        return _fail(str(e), exit_codes.INFRA, every_rank=alone)
    except (ConfigError, DataError, CheckpointError, RunFolderBusy) as e:
        remove_if_left_empty(cfg.checkpoint.output_dir, fresh)  # a refused start leaves no empty run folder
        return _fail(str(e))
    except RuntimeError as e:  # a collective that timed out before the watchdog noticed: the same hang
        from moe_dist.run import watchdog

        watch = watchdog.active()
        if watch is None or not watchdog.is_collective_timeout(e):
            raise
        watch.fire(f"a collective timed out ({(str(e).splitlines() or [''])[0][:200]})", e)  # exits HUNG
        raise
    except OSError as e:  # the machine, not the code: a full disk, a file removed under us
        remove_if_left_empty(cfg.checkpoint.output_dir, fresh)
        where = f": {e.filename}" if e.filename else ""
        alone = True
        return _fail(f"{e.strerror or e}{where}", exit_codes.INFRA if exit_codes.is_infra(e) else exit_codes.USAGE,
                     every_rank=True)
    finally:
        shutdown(barrier=not alone)


def _train(cfg, args, held: ExitStack) -> int:  # noqa: ANN001 - internal
    import signal

    from moe_dist.checkpoint.manager import CheckpointManager
    from moe_dist.checkpoint.reader import read_train_state
    from moe_dist.checkpoint.resume import preflight_resume
    from moe_dist.config import ConfigError
    from moe_dist.data.loader import build_data, check_same_data
    from moe_dist.data.sampler import GlobalCursorSampler
    from moe_dist.debug import (dump_loaded_state_from_env, dump_probe_logits_from_env, grad_dump_probe_from_env,
                                strict_device_from_env)
    from moe_dist.run.metrics import MetricsLog
    from moe_dist.plan.param_counts import count_params
    from moe_dist.run import init_from as init_weights
    from moe_dist.run import artifacts as run_artifacts, trackers
    from moe_dist.logging_utils import get_logger
    from moe_dist.parallel.runtime import build_engine, init_runtime
    from moe_dist.run.folder import check_fresh_start, set_aside_later_checkpoints
    from moe_dist.run.host_memory import for_training_on
    from moe_dist.run.lock import hold_run_folder
    from moe_dist.run import watchdog
    from moe_dist.run.trainer import Trainer
    from moe_dist.run.ui import TrainUI

    stop_at = cfg.checkpoint.stop_at_step
    report_to = trackers.requested(cfg)  # a tracker that is not installed fails now
    _check_output_dir(cfg.checkpoint.output_dir)
    rt = init_runtime(cfg, args.deepspeed_config, trackers.accelerator_kwargs(report_to, cfg.checkpoint.output_dir))
    host_memory = for_training_on(rt.device.type)  # before the data and the engine allocate
    if host_memory and rt.is_main:
        get_logger().info(host_memory)
    # One live writer per folder: a second run stops here, on every rank, before it reads the folder.
    lock = hold_run_folder(cfg.checkpoint.output_dir, rt.rank)
    if lock is not None:
        held.callback(lock.release)
    moved = check_fresh_start(cfg.checkpoint.output_dir, cfg.checkpoint.resume, args.overwrite,
                              move=rt.is_main)
    if moved is not None:
        get_logger().info(f"--overwrite: moved the previous run in {cfg.checkpoint.output_dir} to {moved}")
    resume_path = preflight_resume(cfg)  # a wrong --resume fails now, not after the engine is built
    data = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed)
    if resume_path is not None:  # ... and so does other data
        saved_data = read_train_state(resume_path).get("data")
        check_same_data(saved_data, data.fingerprint_like(saved_data), str(resume_path))
    init_from = cfg.checkpoint.init_from if resume_path is None else None  # a checkpoint to resume wins
    if init_from:
        init_weights.check(init_from, cfg.model)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({data.tokenizer.vocab_size}); set --set model.vocab_size={data.tokenizer.vocab_size}")
    _, engine = build_engine(rt, cfg, init_weights.reader(init_from) if init_from else None)
    strict_device_from_env()  # tests: from here on an implicit device is an error (see moe_dist.debug)

    sampler = GlobalCursorSampler(len(data.train_blocks), cfg.train.global_batch_size, cfg.train.seed)
    metrics = MetricsLog(os.path.join(cfg.checkpoint.output_dir, "metrics.jsonl"), enabled=rt.is_main)
    trainer = Trainer(cfg, rt, engine, data, sampler, metrics)
    trainer.grad_probe = grad_dump_probe_from_env(rt.rank)
    ckpt = CheckpointManager(cfg, rt, engine, trainer, tokenizer_spec=data.tokenizer.to_spec())
    resumed_from = ckpt.maybe_resume()
    if resumed_from:
        dump_loaded_state_from_env(engine)  # tests: what the load put into the engine
    metrics.truncate_after(trainer.state.step)  # rows past the start step are recomputed: one row per step
    if rt.is_main and cfg.checkpoint.resume != "auto":  # auto skips only damaged later ones: left in place
        later = set_aside_later_checkpoints(cfg.checkpoint.output_dir, resumed_from, trainer.state.step)
        if later:
            get_logger().info(f"resumed at step {trainer.state.step}: moved the later checkpoints of this folder "
                              f"({', '.join(later)}) to {cfg.checkpoint.output_dir}.old-<time>/checkpoints")
        run_artifacts.write_config(cfg, cfg.checkpoint.output_dir)
    trackers.start(rt.accelerator, cfg, report_to)

    watch = watchdog.arm(cfg, rt, trainer, keep_groups=(ckpt.pg,))  # DCP's group keeps the init timeout
    held.callback(watch.stop)

    def _on_step(record: dict[str, Any]) -> None:
        watch.after_step()  # after the first: every other group on the train timeout
        ui.on_step(record)
        trackers.log(rt.accelerator, report_to, record)

    stop: dict[str, Any] = {"signal": None, "agreed": False}

    def _on_signal(signum, frame):  # noqa: ANN001
        stop["signal"] = stop["signal"] or signum

    def _should_stop() -> bool:
        if ckpt.stop_requested(stop["signal"] is not None):  # a signal on any rank stops every rank
            stop["agreed"] = True
        return stop["agreed"] or (stop_at is not None and trainer.state.step >= stop_at)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)

    pc = count_params(cfg.model)
    with TrainUI(rt.is_main, cfg.train.max_steps, trainer.state.step, cfg.train.log_every) as ui:
        ui.print(f"[bold]moe_dist[/] preset {cfg.preset}: {pc.total / 1e6:.1f}M params ({pc.active / 1e6:.1f}M active), "
                 f"world {rt.world_size}, {rt.engine_label}, EP {cfg.parallel.ep_size}, "
                 f"optimizer {rt.optimizer_kind}, {str(next(engine.module.parameters()).dtype).removeprefix('torch.')}"
                 + (f", resumed from {resumed_from} at step {trainer.state.step}" if resumed_from else "")
                 + (f", weights from {init_from}" if init_from and not resumed_from else ""))
        trainer.fit(on_step=_on_step, after_step=ckpt.after_step, should_stop=_should_stop)
        watch.beat("final checkpoint", trainer.state.step, long=True)  # a save may outlast a step's limit
        saved = ckpt.finish(interrupted=False)  # a stop by signal is reported in one line below
        dump_probe_logits_from_env(engine, data, rt.rank)
        trackers.finish(rt.accelerator, report_to)
        if rt.is_main:
            run_artifacts.plot_loss_curve(cfg.checkpoint.output_dir)
        ui.summary(metrics.history, {"world size": rt.world_size, "engine": rt.engine_label,
                                     "EP size": cfg.parallel.ep_size,
                                     "checkpoint": saved or "-"})
    if stop["agreed"]:
        how = signal.Signals(stop["signal"]).name if stop["signal"] else "a signal to another rank"
        if rt.is_main:
            print(f"preempted: stopped by {how} at step {trainer.state.step}, saved {saved}; continue with "
                  f"--resume auto (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    return 0


def main() -> None:
    from moe_dist.parallel.launcher_guard import die_with_launcher

    die_with_launcher()  # first: an orphan of a dead torchrun/accelerate agent must not train or save
    from torch.distributed.elastic.multiprocessing.errors import record

    # An exception nobody expected is written to torchelastic's error file, so the launcher's summary
    # shows this rank's traceback as the root cause instead of "error_file: <N/A>".
    code = record(run)()
    code = 0 if code is None else code  # record turns argparse's SystemExit(0) (--help) into None
    # DeepSpeed's ZeRO-3 (with or without offload) can abort in C++ static destructors at interpreter
    # exit ("terminate called without an active exception") even after the process group is destroyed,
    # turning a finished run into a crash. Everything is saved and flushed by now: leave directly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
