"""The ``moe`` command: one front door to every tool, ``moe <command> [its flags]``.

    moe train --preset tiny --max-steps 20 --output-dir runs/demo
    moe plan --preset 4090 --gpu-mem 24GB --cpu-mem 64GB
    moe consolidate runs/demo/checkpoints/checkpoint_latest --verify
    moe train --help                        # the same text as moe-train --help

Each command runs the same function as its own console script (``moe train`` is ``moe-train``, ...)
with the rest of the command line. Only the chosen command's module is imported, on dispatch, so
``moe --help`` answers without importing torch. Multi-process training still starts from a
launcher: ``accelerate launch moe_dist/train.py ...``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

# name -> (module, function: what its moe-<name> console script calls, one line for ``moe --help``)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("moe_dist.train", "main", "train a model in this process (launchers: accelerate launch moe_dist/train.py)"),
    "plan": ("moe_dist.plan.cli", "main", "estimate GPU and CPU memory of a run; --choose a layout, --fit a model"),
    "prepare-data": ("moe_dist.data.prepare", "main", "tokenize documents once into a token store"),
    "ckpt": ("moe_dist.checkpoint.cli", "main", "list, inspect and verify checkpoints"),
    "consolidate": ("moe_dist.export.consolidate_cli", "main",
                    "a checkpoint -> one .pt, a safetensors or a Hugging Face (Mixtral) folder"),
    "generate": ("moe_dist.export.inference", "generate_main", "sample text from a checkpoint or an export"),
}


def help_text() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {line}" for name, (_, _, line) in COMMANDS.items())
    return ("usage: moe <command> [flags]\n\n"
            "moe_dist: train Mixture-of-Experts LMs, plan their memory, get their weights out.\n\n"
            f"commands:\n{rows}\n\n"
            "moe <command> --help shows that command's flags (the same as moe-<command> --help).")


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(help_text())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        from .cli_args import did_you_mean

        print(f"moe: error: unknown command {name!r}{did_you_mean(name, COMMANDS)} (commands: {', '.join(COMMANDS)}; "
              "see moe --help)", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module), function)
    # The console scripts call their function with no arguments and argparse reads sys.argv: do the same,
    # under the console script's name, so `moe <name> ...` is `moe-<name> ...` exactly.
    saved, sys.argv = sys.argv, [f"moe-{name}", *rest]
    try:
        code = entry()
    finally:
        sys.argv = saved
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
