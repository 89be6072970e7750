"""``moe-consolidate``'s command line: the flags of :func:`moe_dist.export.consolidate.consolidate`,
a rich progress bar on stderr, one line per user error (see that module for what is written).

Exit codes: 0 done, 1 ``--verify`` found a difference, 2 a user error (one line, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ..cli_args import Parser
from ..checkpoint.errors import CheckpointError
from ..checkpoint.reader import Advance
from .consolidate import DEFAULT_MAX_SHARD, DTYPES, consolidate
from .errors import ConsolidateError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="moe-consolidate",
        description="Turn a moe_dist DCP checkpoint into one .pt file, a safetensors export or a Hugging Face "
                    "(transformers MixtralForCausalLM) folder, offline on CPU "
                    "(no process group, no DeepSpeed), reading only the model weights with bounded memory.",
        epilog="Exit codes: 0 done, 1 --verify found a difference, 2 a user error.")
    p.add_argument("checkpoint", help="checkpoint_step_<N> folder, checkpoint_latest, a run folder (its newest), or a "
                                      "seed trainer checkpoint_step_<N>.pt")
    p.add_argument("-o", "--out", help="output .pt file, or folder for safetensors / hf (default: "
                   "CHECKPOINT/../consolidated_step_<N>.pt, .../consolidated_step_<N>/ or .../consolidated_step_<N>_hf/)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the written weights (default fp32)")
    p.add_argument("--format", choices=["pt", "safetensors", "hf"], default="pt", dest="fmt",
                   help="output format; hf: a folder transformers.AutoModelForCausalLM loads (Mixtral)")
    p.add_argument("--max-shard-size", help=f"safetensors / hf shard size, e.g. 500MB (default {DEFAULT_MAX_SHARD})")
    p.add_argument("--read-budget", default="32MB",
                   help="bytes per DCP read; peak memory is about this or the largest tensor (default 32MB)")
    p.add_argument("--verify", action="store_true", help="reload the output and compare every tensor")
    p.add_argument("--no-verify-manifest", action="store_true", help="skip the checkpoint's size/checksum check")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--tokenizer", help="'byte' or a local Hugging Face tokenizer folder to store in the output "
                   "instead of the checkpoint's own (e.g. an old checkpoint whose tokenizer folder is gone)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


@contextlib.contextmanager
def _seed_as_checkpoint(a: argparse.Namespace) -> Iterator[str]:
    """A seed trainer ``.pt`` is imported (``moe_dist.seed``) into a temporary run folder first, and the
    output goes beside the ``.pt`` unless ``-o`` says where; any other CHECKPOINT passes through."""
    from ..seed.load import looks_like_seed

    if not looks_like_seed(a.checkpoint):
        yield a.checkpoint
        return
    from ..seed.importer import import_seed

    src = Path(a.checkpoint)
    if a.out is None:
        a.out = str(src.with_name(src.stem + "_moe_dist" + {"pt": ".pt", "safetensors": "", "hf": "_hf"}[a.fmt]))
    with tempfile.TemporaryDirectory(prefix="seed-import-") as tmp:
        yield str(import_seed(str(src), str(Path(tmp) / "run"), log=lambda _line: None))


def main(argv: Optional[list[str]] = None) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (BarColumn, DownloadColumn, Progress as Bar, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from ..debug import strict_device_from_env

    a = build_parser().parse_args(argv)
    strict_device_from_env()  # tests: consolidation names every device (see moe_dist.debug)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    bar = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
              TimeRemainingColumn(), console=err, disable=a.quiet, transient=False)

    def progress(desc: str, total: int) -> Advance:
        task = bar.add_task(desc, total=total)
        return lambda n: bar.advance(task, n)

    try:
        with bar, _seed_as_checkpoint(a) as source:
            res = consolidate(source, a.out, dtype=a.dtype, fmt=a.fmt, max_shard_size=a.max_shard_size,
                              verify=a.verify, verify_manifest=not a.no_verify_manifest, force=a.force,
                              read_budget=a.read_budget, progress=progress, tokenizer=a.tokenizer)
    except (ConsolidateError, CheckpointError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        return 1 if str(e).startswith("verify:") else 2
    rate = res.bytes_read / max(res.seconds, 1e-9) / 1e6
    err.print(f"wrote {escape(str(res.out))} (step {res.step}, {res.tensors} tensors, "
              f"{res.bytes_written / 1e6:,.1f} MB {a.dtype}) in {res.seconds:.2f}s: {res.bytes_read / 1e6:,.1f} MB "
              f"read, {rate:,.0f} MB/s over the whole command (manifest check and write included; the bar shows "
              "the read alone)")
    if res.verified is not None:
        err.print(f"verified {res.verified} tensors against {escape(a.checkpoint)}: identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
