"""What a DCP checkpoint holds, read from its ``.metadata`` alone (no tensor is read): the keys and
their global sizes (``SavedKeys``), which a load checks the model against before ``dcp.load``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .errors import CheckpointError
from .keys import OPTIM_STATE_PREFIX, model_key


@dataclass(frozen=True)
class SavedKeys:
    """What a DCP checkpoint holds, from its ``.metadata`` alone (no tensor is read)."""

    path: str
    sizes: dict[str, Optional[tuple[int, ...]]]  # key -> global size; None for non-tensor entries

    def __contains__(self, key: str) -> bool:
        return key in self.sizes

    @property
    def has_optimizer_states(self) -> bool:
        return any(k.startswith(OPTIM_STATE_PREFIX) for k in self.sizes)

    def require_model(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise :class:`CheckpointError` unless ``model.{name}`` is saved with ``shape``."""
        mk = model_key(name)
        if mk not in self.sizes:
            raise CheckpointError(f"{self.path}: the checkpoint has no weights for parameter '{name}' (key {mk!r}); "
                                  "the model differs from the one saved")
        size = self.sizes[mk]
        if size is None or tuple(size) != tuple(shape):
            raise CheckpointError(f"{self.path}: {mk!r} has shape {size} in the checkpoint but the parameter has "
                                  f"shape {tuple(shape)}; the architecture differs from the one saved")


def read_saved_keys(path: str, reader: Any = None) -> SavedKeys:
    """Keys and global sizes of a DCP checkpoint folder, from its ``.metadata`` (read without
    trusting pickle: :class:`~moe_dist.checkpoint.reader.CheckpointReader`).

    ``reader``: a ``CheckpointReader`` of ``path`` that the caller then hands to ``dcp.load``; it
    keeps the parsed metadata, so a resume unpickles ``.metadata`` once, not twice."""
    from pathlib import Path

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .reader import CheckpointReader

    try:
        md = (reader or CheckpointReader(Path(path))).read_metadata()
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read the DCP metadata ({e.__class__.__name__}: {e}); "
                              "is this a complete checkpoint folder?") from e
    sizes = {k: tuple(m.size) if isinstance(m, TensorStorageMetadata) else None
             for k, m in md.state_dict_metadata.items()}
    return SavedKeys(str(path), sizes)
