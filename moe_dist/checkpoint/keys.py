"""The key names of a DCP checkpoint: one place for every writer and reader.

::

    model.<parameter name>            model weights (global expert ids in the names, so no two
                                      expert-parallel ranks share a key)
    optim.<state>.<parameter name>    optimizer states (exp_avg, exp_avg_sq, momentum_buffer, ...)
    optim_scalar.<...>                optimizer scalars (step counts)
"""

from __future__ import annotations

from typing import Optional

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
OPTIM_SCALAR_PREFIX = "optim_scalar."


def model_key(param_name: str) -> str:
    """The DCP key of a model parameter: ``layers.0.attn.wq.weight`` -> ``model.layers.0.attn.wq.weight``."""
    return MODEL_PREFIX + param_name


def param_name(key: str) -> Optional[str]:
    """The parameter name of a model key; None for any other key (optimizer, scalars)."""
    return key[len(MODEL_PREFIX):] if key.startswith(MODEL_PREFIX) else None
