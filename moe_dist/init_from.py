"""``--init-from CKPT_OR_EXPORT``: start a new run from trained weights, and nothing else.

The source may be a DCP checkpoint (a step folder, ``checkpoint_latest`` or a run folder's
``checkpoints/``; any world size, ZeRO stage or EP degree), a ``.pt`` or safetensors export of
moe-consolidate, or a ``--format hf`` export. Only the model weights are read (through
``moe_dist.inference``'s readers); the optimizer, LR schedule, step counter and data cursor start
fresh, so another corpus is fine. A source of another architecture is refused with the differing
fields named (the check resume uses). ``check`` runs on every rank before anything is built;
``load`` fills the full model on every rank before expert parallelism and ZeRO take their parts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint.errors import CheckpointError
from .checkpoint.resume import check_same_architecture
from .config import ModelConfig

# config.json fields of a --format hf export that fix the architecture, and our field for each.
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "intermediate_size": "d_ff",
             "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "kv_heads",
             "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
             "num_local_experts": "num_experts", "num_experts_per_tok": "top_k",
             "tie_word_embeddings": "tie_embeddings"}


def _hf_folder(path: Path) -> bool:
    from .consolidate import MOE_CONFIG, is_hf_export

    folder = path if path.is_dir() else path.parent
    return is_hf_export(folder) and not (folder / MOE_CONFIG).exists()


def check(path: str, model_cfg: ModelConfig) -> None:
    """Refuse a missing, unreadable or other-architecture source in one line (cheap: no weights read)."""
    p = Path(path)
    if _hf_folder(p):
        folder = p if p.is_dir() else p.parent
        hf = json.loads((folder / "config.json").read_text())
        diffs = [f"model.{ours}: saved {hf.get(theirs)!r}, requested {getattr(model_cfg, ours)!r}"
                 for theirs, ours in HF_FIELDS.items() if hf.get(theirs) != getattr(model_cfg, ours)]
        if model_cfg.expert_type != "swiglu" or model_cfg.shared_expert:
            diffs.append(f"model.expert_type/shared_expert: saved 'swiglu'/False (a Mixtral export), requested "
                         f"{model_cfg.expert_type!r}/{model_cfg.shared_expert}")
        if diffs:
            raise CheckpointError(f"--init-from {path}: weights of another architecture; differing fields: "
                                  + "; ".join(diffs) + ". Set the model fields to the saved values.")
        return
    from .inference import checkpoint_info

    try:
        info = checkpoint_info(p, verify=False)
    except CheckpointError as e:
        raise CheckpointError(f"--init-from {e}") from None
    check_same_architecture(f"--init-from {path}", info.config["model"], model_cfg)


@torch.no_grad()
def load(path: str, model: nn.Module) -> None:
    """Copy the source's weights into ``model`` (the full model, before expert parallelism)."""
    p = Path(path)
    if not _hf_folder(p):
        from .inference import load_checkpoint

        load_checkpoint(p, model)
        return
    from safetensors import safe_open

    from .consolidate import safetensors_files
    from .export_hf import hf_tensor_name

    folder = p if p.is_dir() else p.parent
    wanted: dict[str, Any] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # a tied head is its embedding
            seen.add(id(t))
            wanted[hf_tensor_name(name)] = t
    for file in safetensors_files(folder, None):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in wanted:
                    wanted.pop(key).detach().copy_(f.get_tensor(key))
    if wanted:
        raise CheckpointError(f"--init-from {path}: the export lacks {len(wanted)} tensors the model needs "
                              f"({', '.join(list(wanted)[:3])}…); export it again with moe-consolidate --format hf")
