"""One rank of a start-up measurement: the process group, the model, the engine; memory at each stage.

``python -m tests.distributed.startup_worker --report OUT.json <moe-train flags>`` as N gloo ranks
(``harness``). Each rank writes ``OUT.json.rank<r>``: its resident set (Linux ``/proc/self/status``)

* ``rss_before_build_mb``: after imports and the process group, before the model;
* ``hwm_before_build_mb``: the peak until then;
* ``hwm_build_mb``: the peak while the model is built (``build_model``; the peak is reset first);
* ``hwm_startup_mb``: the peak from process start to an engine ready to train (``prepare_engine``);

and the parameter elements it holds after the build (``local_numel``; a ZeRO-3 partition counts
its own elements) against the model's (``model_numel``). Used by ``test_startup.py`` and
``benchmarks/bench_startup.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def _local_numel(model: torch.nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return n


def main() -> int:
    argv = sys.argv[1:]
    i = argv.index("--report")
    report = Path(argv[i + 1])
    del argv[i:i + 2]
    from moe_dist.run.cli import parse
    from moe_dist.plan.param_counts import count_params
    from moe_dist.parallel.deepspeed.setup import prepare_engine
    from moe_dist.parallel.runtime import build_model, init_runtime, shutdown

    args, cfg = parse(argv)
    rt = init_runtime(cfg, args.deepspeed_config)
    out = {"rank": rt.rank, "world": rt.world_size, "zero_stage": rt.zero_stage, "ep_size": cfg.parallel.ep_size,
           "sharded_build": cfg.parallel.sharded_build, "model_numel": count_params(cfg.model).total,
           "rss_before_build_mb": _status_mb("VmRSS"), "hwm_before_build_mb": _status_mb("VmHWM")}
    _reset_peak()
    model = build_model(rt, cfg)
    out["hwm_build_mb"] = _status_mb("VmHWM")
    out["local_numel"] = _local_numel(model)
    prepare_engine(rt, model, cfg)
    out["hwm_startup_mb"] = max(out["hwm_before_build_mb"], _status_mb("VmHWM"))
    Path(f"{report}.rank{rt.rank}").write_text(json.dumps(out))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
