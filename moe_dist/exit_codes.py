"""How a training run ends, as the exit status a job script or scheduler acts on. The one place
these numbers live: ``moe-train --help``, the README and the tests read them from here.

A script's rule of thumb: retry (``--resume auto``) on PREEMPTED, INFRA and HUNG; fix something
first on USAGE and DIVERGED. 1 stays Python's own: an unexpected exception, with its traceback.
"""

from __future__ import annotations

import errno

OK = 0
USAGE = 2  # a mistake in the command or its files: the `error:` line names it; fix and rerun
DIVERGED = 3  # loss or gradient norm not finite for train.max_nonfinite_steps steps in a row; nothing saved from it
INFRA = 74  # EX_IOERR: the machine, not the command (disk full, read-only or vanished folder, truncated store): retry
PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM / Ctrl-C after saving a checkpoint: rerun with --resume auto
HUNG = 76  # a rank made no progress for longer than parallel.train_timeout_s (see hang-<rank>.txt): retry

MEANING = {
    OK: "finished",
    USAGE: "a mistake in the command or its files (one 'error:' line says which); fix it, then rerun",
    DIVERGED: "diverged: loss or gradient norm not finite for train.max_nonfinite_steps steps in a row (one "
              "'error:' line names the step and values); lower the LR or resume an earlier checkpoint",
    INFRA: "an infrastructure fault worth retrying (disk full, read-only or vanished folder, truncated token "
           "store; one 'error:' line names it); fix or wait, then rerun with --resume auto",
    PREEMPTED: "stopped by SIGTERM or Ctrl-C after saving a checkpoint (preempted, saved); rerun with --resume auto",
    HUNG: "a rank stopped making progress for longer than parallel.train_timeout_s (stacks in "
          "<output-dir>/hang-<rank>.txt); rerun with --resume auto",
}


def help_text() -> str:
    """The exit codes, one sentence each, for ``--help``."""
    return "Exit codes: " + "; ".join(f"{code} {text}" for code, text in MEANING.items()) + \
        "; 1 an unexpected crash (a traceback)."


class InfraError(RuntimeError):
    """A fault of the machine, not the command (a save that could not be written, a checkpoint folder
    that vanished, a token store cut short): the run exits with ``INFRA`` and one ``error:`` line."""


# errno values that mean the storage failed us rather than the user: out of space or quota, read-only,
# an I/O error, a file-size limit. Anything else (not a directory, permission denied) is a USAGE mistake.
INFRA_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})


def is_infra(e: OSError) -> bool:
    return e.errno in INFRA_ERRNOS
