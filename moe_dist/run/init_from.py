"""``--init-from CKPT_OR_EXPORT``: start a new run from trained weights, and nothing else.

The source may be a DCP checkpoint (a step folder, ``checkpoint_latest`` or a run folder's
``checkpoints/``; any world size, ZeRO stage or EP degree), a ``.pt`` or safetensors export of
moe-consolidate, or a ``--format hf`` export. Only the model weights are read (through
``moe_dist.export.inference``'s readers); the optimizer, LR schedule, step counter and data cursor start
fresh, so another corpus is fine. A source of another architecture is refused with the differing
fields named (the check resume uses). ``check`` runs on every rank before anything is built;
``reader`` returns ``fill(name, tensor)``, which copies one parameter's value: the sharded build
(``parallel/materialize.py``) calls it for the parameters a rank builds, and only reads those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..checkpoint.errors import CheckpointError
from ..checkpoint.resume import check_same_architecture
from ..config import ModelConfig

# config.json fields of a --format hf export that fix the architecture, and our field for each.
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "intermediate_size": "d_ff",
             "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "kv_heads",
             "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
             "num_local_experts": "num_experts", "num_experts_per_tok": "top_k",
             "tie_word_embeddings": "tie_embeddings"}


def _hf_folder(path: Path) -> bool:
    from ..export.hf import is_hf_export
    from ..export.safetensors_writer import MOE_CONFIG

    folder = path if path.is_dir() else path.parent
    return is_hf_export(folder) and not (folder / MOE_CONFIG).exists()


def check(path: str, model_cfg: ModelConfig) -> None:
    """Refuse a missing, unreadable or other-architecture source in one line (cheap: no weights read)."""
    p = Path(path)
    if _hf_folder(p):
        folder = p if p.is_dir() else p.parent
        hf = json.loads((folder / "config.json").read_text())
        fields = _remote_fields(model_cfg) if hf.get("model_type") == "moe_dist" else HF_FIELDS
        diffs = [f"model.{ours}: saved {hf.get(theirs)!r}, requested {getattr(model_cfg, ours)!r}"
                 for theirs, ours in fields.items() if hf.get(theirs) != getattr(model_cfg, ours)]
        if fields is HF_FIELDS and (model_cfg.expert_type != "swiglu" or model_cfg.shared_expert):
            diffs.append(f"model.expert_type/shared_expert: saved 'swiglu'/False (a Mixtral export), requested "
                         f"{model_cfg.expert_type!r}/{model_cfg.shared_expert}")
        if diffs:
            raise CheckpointError(f"--init-from {path}: weights of another architecture; differing fields: "
                                  + "; ".join(diffs) + ". Set the model fields to the saved values.")
        return
    from ..export.inference import checkpoint_info

    try:
        info = checkpoint_info(p, verify=False)
    except CheckpointError as e:
        raise CheckpointError(f"--init-from {e}") from None
    check_same_architecture(f"--init-from {path}", info.config["model"], model_cfg)


def _remote_fields(model_cfg: ModelConfig) -> dict[str, str]:
    """config.json fields of a --format hf export with its own modeling file (``export/hf.py``): ours."""
    from ..export.hf import remote_code_config

    written = remote_code_config(model_cfg, torch.float32, None, {})
    same = {k: k for k in written if hasattr(model_cfg, k) and k not in ("vocab_size",)}
    return {**same, "vocab_size": "vocab_size", "num_experts_per_tok": "top_k", "tie_word_embeddings": "tie_embeddings"}


def _safetensors_index(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> the file holding it (reads the headers only)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            where.update({k: file for k in f.keys()})
    return where


def reader(path: str) -> Callable[[str, torch.Tensor], None]:
    """``fill(name, tensor)``: copy the source's value of parameter ``name`` (our state_dict name)
    into ``tensor`` (the parameter's full shape), reading that tensor only. So a rank can take its
    weights one parameter at a time, the ones it builds (``parallel/materialize.py``)."""
    p = Path(path)
    if _hf_folder(p):
        from ..export.safetensors_writer import safetensors_files
        from ..export.hf import hf_tensor_name, remote_tensor_name

        folder = p if p.is_dir() else p.parent
        remote = json.loads((folder / "config.json").read_text()).get("model_type") == "moe_dist"
        where = _safetensors_index(safetensors_files(folder, None))
        rename = remote_tensor_name if remote else hf_tensor_name
        hint = "export it again with moe-consolidate --format hf"
    else:
        from ..export.inference import checkpoint_info

        info = checkpoint_info(p)
        if info.kind == "dcp":
            from ..checkpoint.keys import model_key

            ckpt, stored = info.source, info.source.metadata

            def fill_dcp(name: str, t: torch.Tensor) -> None:
                key = model_key(name)
                _check_source(path, name, tuple(stored[key].size) if key in stored else None, t)
                ckpt.load({key: t})

            return fill_dcp
        if info.kind == "pt":
            sd = info.source["model_state_dict"]

            def fill_pt(name: str, t: torch.Tensor) -> None:
                _check_source(path, name, tuple(sd[name].shape) if name in sd else None, t)
                t.copy_(sd[name])

            return fill_pt
        where, rename, hint = _safetensors_index(info.source), (lambda name: name), "export it again"

    def fill_safetensors(name: str, t: torch.Tensor) -> None:
        from safetensors import safe_open

        key = rename(name)
        if key not in where:
            raise CheckpointError(f"--init-from {path}: the export lacks {key}, which the model needs; {hint}")
        with safe_open(str(where[key]), "pt") as f:
            src = f.get_tensor(key)
        _check_source(path, name, tuple(src.shape), t)
        t.copy_(src)

    return fill_safetensors


def _check_source(path: str, name: str, found: Optional[tuple[int, ...]], t: torch.Tensor) -> None:
    if found is None:
        raise CheckpointError(f"--init-from {path}: no tensor {name} in the source, which the model needs; "
                              "check that it was written by this model's architecture")
    if found != tuple(t.shape):
        raise CheckpointError(f"--init-from {path}: {name} has shape {list(found)} in the source, the model "
                              f"expects {list(t.shape)}; set the model fields to the saved values")


@torch.no_grad()
def load(path: str, model: nn.Module) -> None:
    """Copy the source's weights into ``model`` (a full model, every parameter present)."""
    from ..model import per_expert_fill
    from ..parallel.materialize import fill_full

    fill_full(model, per_expert_fill(model, reader(path)))
