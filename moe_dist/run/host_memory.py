"""Host memory: freed large blocks stay in the process for the next step instead of going back to the OS.

glibc serves an allocation above its mmap threshold (at most 32 MiB by its own rules) with a fresh
``mmap`` and unmaps it on free. A training step on the CPU frees and re-makes the same large
buffers every step (gradients, DeepSpeed's flattened partition and fp64 norm copies, an MoE
layer's activations), so every step touches hundreds of MB of new pages and the kernel zeroes each
page on its first touch. Measured on the ``100m`` preset under ZeRO-2 on one CPU process: 380,000
minor faults and about 1.1 s of kernel time a step against a 2.2 s bare step; with freed blocks
kept, 5 faults and 0.01 s (``benchmarks/results/2026-12-03-train-step-kept``). CUDA's caching allocator
does the same for GPU memory; this is its host-side counterpart.

:func:`keep_freed_host_memory` raises glibc's mmap threshold to 1 GiB and its trim threshold to
2 GiB (``mallopt``): allocations below 1 GiB come from the heap and freed memory up to 2 GiB stays
mapped for reuse. The cost is resident memory: the process keeps up to 2 GiB of freed heap, and a
pattern that fragments the heap can hold more before it settles (+0.35 GB on that ``100m`` run, 4.8
-> 5.15 GB peak). So it is applied to runs that train on the CPU only (:func:`for_training_on`,
called by ``train.py`` and the benchmarks' worker); a GPU run's host side allocates little per
step. It does nothing when the user chose an allocator policy (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``, a preloaded jemalloc or tcmalloc), outside glibc,
or with ``MOE_DIST_KEEP_FREED_MEMORY=0``. Torch-free.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Mapping, Optional

OPT_OUT = "MOE_DIST_KEEP_FREED_MEMORY"
MMAP_THRESHOLD = 1 << 30       # bytes: allocations below this come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap kept mapped (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
_USER_POLICY = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def _skip_reason(env: Mapping[str, str]) -> Optional[str]:
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{OPT_OUT}={env[OPT_OUT]}"
    chosen = [v for v in _USER_POLICY if v in env]
    if chosen:
        return f"{chosen[0]} is set"
    preload = env.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return "another allocator is preloaded"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None


def _mallopt(option: int, value: int) -> int:
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(option, value)


def restore_glibc_defaults() -> None:
    """Back to glibc's starting thresholds (128 KiB each; its sliding mmap threshold stays off): for a
    benchmark that measures both ways in one process. Where :func:`keep_freed_host_memory` stood
    aside (the user's own policy, the opt-out), this does too."""
    if _skip_reason(os.environ) is None:
        _mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        _mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def for_training_on(device_type: str) -> Optional[str]:
    """The policy for a run that trains on ``device_type``: applied on the CPU (the line that says so),
    nothing elsewhere (None)."""
    return keep_freed_host_memory() if device_type == "cpu" else None


def keep_freed_host_memory(env: Optional[Mapping[str, str]] = None) -> str:
    """Apply the policy above to this process; the one line that says what was done."""
    env = os.environ if env is None else env
    reason = _skip_reason(env)
    if reason is not None:
        return f"host memory: glibc's allocator left as it is ({reason})"
    # Setting either threshold also turns off glibc's sliding mmap threshold.
    trim, mmap = _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD), _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if not (trim and mmap):
        return (f"host memory: glibc refused mallopt (trim {trim}, mmap {mmap}); freed blocks go back to "
                "the OS as by default")
    return (f"host memory: freed blocks below {MMAP_THRESHOLD >> 30} GiB are kept for reuse (glibc mallopt), "
            f"so steps do not page-fault on fresh buffers; {OPT_OUT}=0 turns it off")
