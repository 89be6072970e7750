"""A quiet console: the third-party lines our own defaults cause are dropped, unless ``--verbose``.

Each entry of ``NOISE`` is one line some library prints on every run of ours, with why it says
nothing to the user. ``QuietStream`` wraps ``sys.stdout`` / ``sys.stderr`` of a training process
and drops a write that is exactly such a line (``print`` writes the text, then the newline: the
newline after a dropped line goes too). Everything else passes through untouched and at once, so
progress bars and tracebacks are as before. Lines printed by the launcher (``accelerate launch``,
torchrun) before our code runs are out of reach: README "Quiet console" lists them and their fix.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

NOISE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully"),
     "DeepSpeed's CPU comm op, loaded (prebuilt) by every rank at start: a success note, once per rank"),
    (re.compile(r".*\[real_accelerator\.py:\d+:get_accelerator\] Setting accelerator to CPU.*"),
     "DeepSpeed on a machine without a GPU; moe_dist names the accelerator itself (DS_ACCELERATOR)"),
]


class QuietStream:
    """A text stream that drops the writes ``NOISE`` matches and forwards everything else."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner
        self._eat_newline = False
        self.dropped = 0

    def write(self, text: str) -> int:
        if self._eat_newline and text == "\n":
            self._eat_newline = False
            return len(text)
        self._eat_newline = False
        line = text.rstrip("\n")
        if line and "\n" not in line and any(p.fullmatch(line) for p, _ in NOISE):
            self.dropped += 1
            self._eat_newline = not text.endswith("\n")
            return len(text)
        return self._inner.write(text)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - flush, fileno, isatty, encoding, ...
        return getattr(self._inner, name)


def quiet_console(verbose: bool) -> None:
    """Wrap this process's stdout and stderr (once), unless ``verbose``."""
    if verbose:
        return
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, QuietStream):
            setattr(sys, name, QuietStream(stream))
