"""Make ``TORCH_CUDA_ARCH_LIST`` readable by DeepSpeed's JIT op builder.

Hopper and Blackwell images often set arch-specific targets such as ``9.0a`` or ``10.0a`` (the
``a`` unlocks wgmma and the tensor-memory instructions). torch accepts them; DeepSpeed 0.19.8's JIT
builder parses each entry as integers and fails at the first op build, on the first optimizer step
(``ValueError: invalid literal for int() with base 10: '0a'``), seen on an H200 with the image's
``TORCH_CUDA_ARCH_LIST=9.0a``. The ops DeepSpeed builds for us (FusedAdam, CPU Adam) use no
arch-specific instruction, so building them for the plain architecture loses nothing.
"""

from __future__ import annotations

import os
import re
from typing import MutableMapping, Optional

_SUFFIXED = re.compile(r"^(\d+)\.(\d+)[a-zA-Z]+(\+PTX)?$")


def deepspeed_arch_list(value: str) -> Optional[str]:
    """``value`` with arch suffixes dropped (``"8.0;9.0a+PTX"`` -> ``"8.0;9.0+PTX"``), or None when
    DeepSpeed reads it as it is. Order is kept and duplicates are dropped."""
    entries = [e for e in value.replace(" ", ";").split(";") if e.strip()]
    out: list[str] = []
    changed = False
    for entry in entries:
        m = _SUFFIXED.match(entry.strip())
        if m:
            entry, changed = f"{m.group(1)}.{m.group(2)}{m.group(3) or ''}", True
        if entry not in out:
            out.append(entry)
    return ";".join(out) if changed else None


def fix_arch_list_for_deepspeed(environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
    """Rewrite ``TORCH_CUDA_ARCH_LIST`` in this process (and the op builds it starts) if DeepSpeed
    cannot read it; returns a one-line note of what changed, or None."""
    old = environ.get("TORCH_CUDA_ARCH_LIST")
    new = deepspeed_arch_list(old) if old else None
    if new is None:
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = new
    return (f"TORCH_CUDA_ARCH_LIST={old!r}: DeepSpeed's JIT op builder cannot read arch suffixes, so its ops "
            f"are built for {new!r} in this run (they use no arch-specific instruction)")
