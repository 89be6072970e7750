"""The safetensors side of an export: the model's stored tensors in numbered shards under an index
(``write_safetensors_shards``, shared by ``--format safetensors`` and ``--format hf``), the
``--format safetensors`` folder around them (``write_safetensors``: ``config.json`` and
``moe_dist_config.json``), and the reverse: which weight files a folder holds (``safetensors_files``)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from ..checkpoint.errors import CheckpointError

if TYPE_CHECKING:  # annotations only: loading an export must not import torch.distributed.checkpoint
    from ..checkpoint.reader import Advance, Checkpoint, TensorSpec
from ..config import ModelConfig

SAFETENSORS_SINGLE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
MOE_CONFIG = "moe_dist_config.json"


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json``: the usual Hugging Face names for the architecture, plus our own config."""
    return {
        "architectures": ["MoETransformer"], "model_type": "moe_dist",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "expert_type": cfg.expert_type,
        "torch_dtype": str(dtype).removeprefix("torch."), "moe_dist": dataclasses.asdict(cfg),
    }


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a shard closes before it would pass ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nbytes = s.numel * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def write_safetensors_shards(ckpt: Checkpoint, out: Path, dtype: torch.dtype, max_shard: int, budget: int,
                             progress: Optional[Advance],
                             rename: Callable[[str], str] = lambda name: name) -> tuple[int, list[str]]:
    """The model's stored tensors as ``model.safetensors``, or above ``max_shard`` bytes numbered shards and
    ``model.safetensors.index.json``, under ``rename(state_dict name)``. Returns (bytes, file names)."""
    from safetensors.torch import save_file

    stored = ckpt.layout.stored
    shards = _plan_shards(stored, dtype.itemsize, max_shard)
    n = len(shards)
    files = [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    tensors = ckpt.iter_tensors(stored, budget, progress)
    weight_map, total = {}, 0
    umask = os.umask(0)
    os.umask(umask)
    for shard, fname in zip(shards, files):
        part = {}
        for _ in shard:
            s, t = next(tensors)
            key = rename(s.name)
            part[key] = t.to(dtype, copy=True)  # t is a view into the reader's reused buffer
            weight_map[key] = fname
            total += part[key].nbytes
            del t
        save_file(part, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o666 & ~umask)  # safetensors creates files 0600
        del part
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total, files


def write_safetensors(ckpt: Checkpoint, out: Path, dtype: torch.dtype, max_shard: int, budget: int,
                       progress: Optional[Advance]) -> int:
    total, files = write_safetensors_shards(ckpt, out, dtype, max_shard, budget, progress)
    cfg = ckpt.config.model
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
    info = {"format": "moe_dist-consolidated", "format_version": 1, "step": ckpt.step,
            "tokens": ckpt.state.get("tokens"), "dtype": str(dtype).removeprefix("torch."),
            "source": ckpt.folder.name, "files": files,
            "tied": {s.name: s.alias_of for s in ckpt.layout.specs if s.alias_of},
            "config": ckpt.state["config"], "tokenizer": ckpt.state.get("tokenizer") or {},
            "metrics": ckpt.state.get("metrics") or {}}
    (out / MOE_CONFIG).write_text(json.dumps(info, indent=1) + "\n")
    return total


def safetensors_files(folder: Path, index: Optional[Path] = None) -> list[Path]:
    """The weight files of a safetensors export: those its index names, or the single file."""
    index = index or folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e.__class__.__name__}: {e})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names weight files that are missing: {', '.join(missing[:3])}")
        return [folder / n for n in names]
    if (folder / SAFETENSORS_SINGLE).is_file():
        return [folder / SAFETENSORS_SINGLE]
    raise CheckpointError(f"{folder}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} inside")
