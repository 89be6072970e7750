"""The key names of a DCP checkpoint, and its format version: one place for every writer and reader.

The names are those of ``torch.distributed.checkpoint.state_dict.get_state_dict`` saved as
``{"model": ..., "optim": ...}``, so FSDP2 and torchtitan read our checkpoints::

    model.<parameter name>                  model weights, in the parameter's shape (global expert
                                            ids in the names, so no two EP ranks share a key)
    optim.state.<parameter name>.<state>    exp_avg, exp_avg_sq, momentum_buffer (the parameter's
                                            shape) and step (a 0-dim tensor)
"""

from __future__ import annotations

from typing import Optional

MODEL, OPTIM = "model", "optim"
MODEL_PREFIX = MODEL + "."
OPTIM_STATE_PREFIX = OPTIM + ".state."

# The layout of the DCP shards, recorded in train_state.json. 2: every tensor in the model's own
# shape, optimizer states under torch's names (1, never released, stored flat vectors).
FORMAT_VERSION = 2


def model_key(param_name: str) -> str:
    """The DCP key of a model parameter: ``layers.0.attn.wq.weight`` -> ``model.layers.0.attn.wq.weight``."""
    return MODEL_PREFIX + param_name


def optim_key(param_name: str, state: str) -> str:
    """The DCP key of one optimizer state of a parameter: ``optim.state.<name>.exp_avg``."""
    return f"{OPTIM_STATE_PREFIX}{param_name}.{state}"


def param_name(key: str) -> Optional[str]:
    """The parameter name of a model key; None for any other key (optimizer states)."""
    return key[len(MODEL_PREFIX):] if key.startswith(MODEL_PREFIX) else None
