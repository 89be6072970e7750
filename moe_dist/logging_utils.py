"""One logger for the package, set up once, filtered to rank 0, with ``warn_once``.

Library code logs through ``get_logger()``; only the CLI prints with rich.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_LOGGER_NAME = "moe_dist"
_warned: set[str] = set()


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0 or record.levelno >= logging.ERROR


def get_logger() -> logging.Logger:
    logger = logging.getLogger(_LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[moe_dist] %(levelname)s: %(message)s"))
        handler.addFilter(_RankZeroFilter())
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("MOE_DIST_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger


def warn_once(message: str) -> None:
    """Log a warning the first time this exact message is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        get_logger().warning(message)


def quiet_third_party() -> None:
    """DeepSpeed and Accelerate log a lot at INFO on every rank; keep warnings only."""
    for name in ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Deprecation notices from inside torch.distributed / DCP (ShardedTensor, all_gather_into_tensor)
    # that DeepSpeed and DCP trigger, not our code; one per rank per call site otherwise.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor.*")
