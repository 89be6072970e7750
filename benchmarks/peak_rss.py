"""Run one command and report its wall time and peak RSS as one JSON line on stdout.

``python -m benchmarks.peak_rss -- CMD ...``. This process starts only that child, so
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (Linux: KiB) is the child's own peak; the child's
stdout is passed to our stderr so the JSON line stays the last line of stdout.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m benchmarks.peak_rss -- CMD ...", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rc = subprocess.call(argv, stdout=sys.stderr)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"returncode": rc, "seconds": seconds, "peak_rss_mb": peak_kib / 1024}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
