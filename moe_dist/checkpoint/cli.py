"""``moe-ckpt``: look inside a checkpoint folder offline (no process group, no model built).

::

    moe-ckpt info runs/r                                      # the run's newest complete checkpoint
    moe-ckpt info runs/r/checkpoints/checkpoint_step_500
    moe-ckpt verify runs/r/checkpoints/checkpoint_latest      # manifest sizes + checksums, NaN/inf, expert audit
    moe-ckpt verify runs/r --no-checksums                     # sizes only: fast on a big checkpoint
    moe-ckpt import-seed checkpoint_step_5000.pt --output-dir runs/from_seed   # the seed trainer's .pt

PATH is a ``checkpoint_step_<N>`` folder, a ``checkpoint_latest`` link, a ``checkpoints/`` folder
or a run folder (the last two mean their newest complete save: the one ``--resume auto`` takes);
the rule is ``layout.find_checkpoint``, shared with ``--resume`` and ``moe-consolidate``.

Exit codes: 0 fine; 1 the checkpoint is incomplete, corrupt, holds NaN/inf or fails the expert audit;
2 PATH is not a checkpoint (missing, a plain folder, a run with no complete checkpoint).
Problems are one line on stderr, starting with ``error:``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from ..cli_args import Parser
from . import layout
from .errors import CheckpointError

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2


# ----------------------------------------------------------------------------- reading it
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _model_config(folder: Path, state: dict[str, Any]):  # noqa: ANN202 - ModelConfig
    from ..config import ConfigError, ModelConfig

    try:
        return ModelConfig(**state["config"]["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{folder / layout.TRAIN_STATE}: no usable model config ({e})") from None


def _files(folder: Path) -> list[Path]:
    """The files of a checkpoint folder, manifest.json included: the one count info and verify print."""
    return sorted(p for p in folder.iterdir() if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable


def _model_summary(mc: Any) -> tuple[str, str]:  # noqa: ANN401 - ModelConfig
    """(architecture, parameter counts) of a ModelConfig, one line each."""
    from ..plan.param_counts import count_params

    pc = count_params(mc)
    total, active = pc.total, pc.active
    experts = f"{mc.num_experts} experts top-{mc.top_k} ({mc.expert_type}{' + shared' if mc.shared_expert else ''})"
    return (f"d_model {mc.d_model}, {mc.n_layers} layers, {mc.n_heads} heads ({mc.kv_heads} kv), {experts}, "
            f"d_ff {mc.d_ff}, vocab {mc.vocab_size}, max_seq_len {mc.max_seq_len}",
            f"{total:,} total, {active:,} active per token")


def run_folder_of(folder: Path) -> Path:
    """The run folder (``--output-dir``) a checkpoint folder belongs to."""
    return folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent


def problem_of(folder: Path) -> Optional[str]:
    """Why ``--resume auto`` would pass over ``folder`` on its cheap checks (a missing file, a size that
    differs from the manifest, a manifest recording non-finite values), or None: the completeness rule
    ``moe-ckpt info`` shares with it (checksums are ``verify``'s job)."""
    from .finite import check_manifest_finite
    from .manifest import verify_manifest

    try:
        layout.require_complete(folder)
        check_manifest_finite(folder, verify_manifest(folder, checksums=False))
    except CheckpointError as e:
        return str(e)
    return None


def newest_usable(folder: Path, spec: str) -> tuple[Path, list[str]]:
    """For a PATH naming a run (or its ``checkpoints/``): the newest checkpoint ``--resume auto`` would take,
    and the reasons it passed over newer ones. Any other PATH: ``folder`` itself."""
    given = Path(spec)
    if given.name == layout.LATEST or given.resolve() == folder.resolve() or folder.parent.name != "checkpoints":
        return folder, []
    skipped = []
    for _, older in reversed(layout.complete_checkpoints(folder.parent)):
        problem = problem_of(older)
        if problem is None:
            return older, skipped
        skipped.append(problem)
    return folder, skipped


def info_report(folder: Path) -> dict[str, Any]:
    """What ``moe-ckpt info`` shows, as a dict (raises CheckpointError without train_state.json)."""
    from ..run.lock import run_status

    if not (folder / layout.TRAIN_STATE).is_file():
        layout.require_complete(folder)
    state = _read_json(folder / layout.TRAIN_STATE)
    topo = state.get("topology", {})
    files = _files(folder)
    missing = layout.missing_parts(folder)
    problem = problem_of(folder) if not missing else None
    return {
        "path": str(folder), "step": state.get("step"), "tokens": state.get("tokens"),
        "world_size": topo.get("world_size"), "engine": topo.get("engine", "deepspeed"),
        "zero_stage": topo.get("zero_stage"), "ep_size": topo.get("ep_size"),
        "optimizer": topo.get("optimizer"), "bytes": sum(p.stat().st_size for p in files), "files": len(files),
        "saved_at": state.get("saved_at"), "torch": state.get("torch"), "preset": state.get("config", {}).get("preset"),
        **dict(zip(("model", "parameters"), _model_summary(_model_config(folder, state)))),
        "complete": not missing and problem is None, "missing": missing, "problem": problem,
        "live": run_status(run_folder_of(folder)),  # the holder of the run folder's lock, or None
    }


def verify_checkpoint(folder: Path, checksums: bool = True) -> str:
    """Manifest (sizes, checksums unless ``checksums=False``) then the expert audit; the OK line."""
    from .audit import audit_experts
    from .manifest import HASH_NAME, verify_manifest

    from .finite import check_manifest_finite, scan_folder

    layout.require_complete(folder)
    manifest = verify_manifest(folder, checksums=checksums)
    check_manifest_finite(folder, manifest)
    state = _read_json(folder / layout.TRAIN_STATE)
    if manifest.get("step") is not None and manifest.get("step") != state.get("step"):
        raise CheckpointError(f"{folder}: manifest says step {manifest['step']}, {layout.TRAIN_STATE} says "
                              f"{state.get('step')}; the files come from different saves")
    mc = _model_config(folder, state)
    try:
        audit = audit_experts(folder, mc)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable .metadata (only possible with --no-checksums)
        raise CheckpointError(f"{folder / layout.DCP_METADATA}: unreadable DCP metadata "
                              f"({e.__class__.__name__}: {e})") from None
    if checksums:  # every byte is read anyway: read every tensor too
        scan_folder(folder)
    files = _files(folder)  # what info counts: the listed files and manifest.json
    size = sum(p.stat().st_size for p in files)
    what = (f"sizes and checksums ({HASH_NAME}) match the manifest, every tensor finite" if checksums
            else "sizes match the manifest (checksums and finiteness scan skipped)")
    return (f"OK {folder}: step {state.get('step')}, {len(files)} files, {human_bytes(size)} (as moe-ckpt info counts "
            f"them, manifest.json included); {what}; {mc.num_experts} experts x {audit['layers']} layers each saved "
            "exactly once")


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="moe-ckpt", description="Inspect and verify moe_dist checkpoints (offline, no GPU or process group).",
        epilog="PATH: a checkpoint_step_<N> folder, checkpoint_latest, or a run folder (its latest checkpoint). "
               "Exit codes: 0 ok, 1 checkpoint incomplete/corrupt, 2 PATH is not a checkpoint.")
    sub = p.add_subparsers(dest="command", metavar="{info,verify,import-seed}")
    info = sub.add_parser("info", help="Step, tokens, topology, optimizer, size, saved_at and model of a checkpoint.")
    info.add_argument("path", metavar="PATH")
    ver = sub.add_parser("verify", help="Check every file against manifest.json, every tensor for NaN/inf and "
                                        "audit the experts; prints OK or the one-line problem.")
    ver.add_argument("path", metavar="PATH")
    ver.add_argument("--no-checksums", action="store_true",
                     help="Check file sizes only, not checksums or finiteness (fast; misses flipped bits).")
    imp = sub.add_parser("import-seed", help="Turn a seed trainer checkpoint (checkpoint_step_<N>.pt) into a moe_dist "
                                             "run folder with its whole training state; resume it with moe-train "
                                             "--config DIR/config.yaml --output-dir DIR --resume auto.")
    imp.add_argument("path", metavar="FILE.pt")
    imp.add_argument("--output-dir", required=True, help="A new (or empty) run folder to write.")
    imp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="Config overrides for the run (e.g. data.tokenizer=DIR, data.store=DIR).")
    return p


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _print_info(info: dict[str, Any]) -> None:
    from rich.console import Console

    from ..run.lock import describe_holder
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # no wrapping in logs
    table = Table(title=f"checkpoint {info['path']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")

    def num(v: Any) -> str:  # noqa: ANN401
        return f"{v:,}" if isinstance(v, int) else str(v if v is not None else "-")

    rows = [
        ("step", num(info["step"])), ("tokens", num(info["tokens"])), ("world size", num(info["world_size"])),
        ("engine", num(info["engine"])), ("ZeRO stage", num(info["zero_stage"])), ("EP degree", num(info["ep_size"])),
        ("optimizer", num(info["optimizer"])),
        ("size on disk", f"{human_bytes(info['bytes'])} ({info['bytes']:,} bytes)"), ("files", num(info["files"])),
        ("saved at", num(info["saved_at"])), ("preset", num(info["preset"])), ("model", info["model"]),
        ("parameters", info["parameters"]),
        ("complete", "yes" if info["complete"] else
         f"[red]no[/] ({'missing ' + ', '.join(info['missing']) if info['missing'] else info['problem']})"),
        ("live run", f"[bold]yes[/]: {describe_holder(info['live'])} (writing to this folder)" if info["live"]
         else "no"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _import_seed(args: argparse.Namespace) -> int:
    from ..config import ConfigError, parse_set_args
    from ..seed.importer import import_seed

    try:
        import_seed(args.path, args.output_dir, parse_set_args(args.set))
    except (CheckpointError, ConfigError) as e:
        _error(str(e))
        return EXIT_USAGE
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "import-seed":
        return _import_seed(args)
    try:
        folder = layout.find_checkpoint(args.path)  # not a checkpoint: exit 2; incomplete: 1, below
    except CheckpointError as e:
        _error(str(e))
        return EXIT_USAGE
    try:
        if args.command == "info":
            folder, skipped = newest_usable(folder, args.path)
            for reason in skipped:  # as --resume auto words it
                print(f"skipping a damaged checkpoint: {reason}", file=sys.stderr)
            _print_info(info_report(folder))
        else:
            from rich.console import Console

            Console(highlight=False, soft_wrap=True).print(verify_checkpoint(folder, checksums=not args.no_checksums),
                                                            markup=False)
    except CheckpointError as e:
        _error(str(e))
        return EXIT_BAD
    except OSError as e:  # a file vanished or cannot be read while we look at it
        _error(f"{e.filename or folder}: {e.strerror or e}")
        return EXIT_BAD
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
