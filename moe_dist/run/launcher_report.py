"""Hand the launcher our ``error:`` line, so it ends its failure summary with it.

torchrun and ``accelerate launch`` (torchelastic underneath) print a ~15-line ``ChildFailedError``
block after a rank exits non-zero, below anything the rank printed. Each rank is given a file to
describe its failure in (``TORCHELASTIC_ERROR_FILE``, torchelastic's documented error-file
contract); the block shows its ``py_callstack`` as the root cause's last field, one line above the
closing rule. Writing our one line there puts it in the last lines of the launcher's output, where
a user looks first. Without a launcher the variable is unset and nothing is written.
"""

from __future__ import annotations

import json
import os
import time


def record_for_launcher(line: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:  # the launcher's temporary folder is gone: the line is on stderr all the same
        pass
