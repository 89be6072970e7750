"""``moe-consolidate --format hf``: a Hugging Face ``MixtralForCausalLM`` folder, loaded by
``transformers.AutoModelForCausalLM.from_pretrained`` with no custom code.

Our block is Mixtral's, exactly: pre-norm RMSNorm, rotary positions in the rotate-half layout with
``inv_freq = theta ** (-2i / head_dim)`` (so q/k need no permutation), grouped-query attention whose
k/v head ``g`` serves the ``n_heads / kv_heads`` consecutive query heads from ``g * n_heads / kv_heads``
(our ``repeat_interleave`` is Mixtral's ``repeat_kv``), and routing by an fp32 softmax over all
experts, top-k, then the k weights renormalised to sum to 1 (Mixtral's router does the same). Router
noise and the capacity limit are training-only; ``router_jitter_noise`` is 0. Tensor names are those
of the Mixtral checkpoints on the Hub (what transformers 4.x and vLLM's Mixtral loader read);
transformers 5.x fuses the experts into ``mlp.experts.gate_up_proj`` / ``down_proj`` on load (the
tests load with the installed 5.x):

* ``embed.weight`` -> ``model.embed_tokens.weight``; ``norm.weight`` -> ``model.norm.weight``
* ``layers.i.attn_norm`` / ``ffn_norm`` -> ``model.layers.i.input_layernorm`` / ``post_attention_layernorm``
* ``layers.i.attn.wq/wk/wv/wo`` -> ``model.layers.i.self_attn.q_proj/k_proj/v_proj/o_proj``
* ``layers.i.ffn.router`` -> ``model.layers.i.block_sparse_moe.gate``
* ``layers.i.ffn.experts.e.w_gate/w_up/w_down`` -> ``model.layers.i.block_sparse_moe.experts.e.w1/w3/w2``
* ``lm_head.weight`` -> ``lm_head.weight``, absent when tied (``tie_word_embeddings``)

Where no transformers class computes the model exactly (``expert_type=silu_mlp`` experts
``down(silu(up(x)))``, Mixtral's being ``w2(silu(w1 x) * w3 x)``; an ungated shared expert; the seed's
fused qkv, interleaved rotary pairs and sqrt(d) embedding scale), the export ships its own modeling
file (``hf_modeling.py`` as ``modeling_moe_dist.py``, named by ``auto_map``): load it with
``from_pretrained(folder, trust_remote_code=True)``. Its tensors keep our names under ``model.``.

The tokenizer goes along: a Hugging Face tokenizer's own files, or for the byte tokenizer a
``tokenizers`` byte-level model with the same ids (byte ``b`` -> id ``b``, ``<|endoftext|>`` -> 256).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

if TYPE_CHECKING:  # annotations only: loading an export must not import torch.distributed.checkpoint
    from ..checkpoint.reader import Advance, Checkpoint
from ..config import ModelConfig
from .errors import ConsolidateError
from .safetensors_writer import write_safetensors_shards
from ..data.errors import DataError
from ..data.tokenizer import ByteTokenizer, hf_tokenizer_files, write_tokenizer_files

REMOTE_MODULE = "modeling_moe_dist"  # the file name hf_modeling.py is shipped under, for trust_remote_code
HF_MARKER = "moe_dist_export"  # key of config.json naming what was exported (and what --force may replace)
BYTE_EOS_TOKEN = "<|endoftext|>"

_RENAMES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(p), f) for p, f in [
        (r"embed\.weight", lambda m: "model.embed_tokens.weight"),
        (r"norm\.weight", lambda m: "model.norm.weight"),
        (r"lm_head\.weight", lambda m: "lm_head.weight"),
        (r"layers\.(\d+)\.attn_norm\.weight", lambda m: f"model.layers.{m[1]}.input_layernorm.weight"),
        (r"layers\.(\d+)\.ffn_norm\.weight", lambda m: f"model.layers.{m[1]}.post_attention_layernorm.weight"),
        (r"layers\.(\d+)\.attn\.w([qkvo])\.weight", lambda m: f"model.layers.{m[1]}.self_attn.{m[2]}_proj.weight"),
        (r"layers\.(\d+)\.ffn\.router\.weight", lambda m: f"model.layers.{m[1]}.block_sparse_moe.gate.weight"),
        (r"layers\.(\d+)\.ffn\.experts\.(\d+)\.w_(gate|up|down)\.weight",
         lambda m: f"model.layers.{m[1]}.block_sparse_moe.experts.{m[2]}."
                   f"{ {'gate': 'w1', 'up': 'w3', 'down': 'w2'}[m[3]]}.weight"),
    ]
]


class ExportError(ConsolidateError):
    """The model cannot be written as a transformers model; the message says why."""


def hf_tensor_name(name: str) -> str:
    """Mixtral's name for one of our ``state_dict`` entries."""
    for pattern, rename in _RENAMES:
        m = pattern.fullmatch(name)
        if m:
            return rename(m)
    raise ExportError(f"{name}: no Mixtral tensor corresponds to it; this moe_dist model cannot be exported as hf")


def is_hf_export(folder: Path) -> bool:
    """Whether ``folder`` holds a ``--format hf`` export written by moe-consolidate."""
    try:
        return HF_MARKER in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def needs_remote_code(cfg: ModelConfig) -> bool:
    """Whether no transformers class computes ``cfg`` exactly, so the export ships ``hf_modeling.py``:
    two-matrix SiLU experts, an ungated shared expert (Qwen2-MoE's is scaled by a learned sigmoid gate),
    a fused qkv, interleaved rotary pairs or an embedding scale (the seed's architecture)."""
    return (cfg.expert_type != "swiglu" or cfg.shared_expert or cfg.fused_qkv or cfg.embed_scale
            or cfg.rope_layout != "half")


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, in one line, what neither Mixtral nor the shipped modeling file computes (nothing today:
    kept as the one place such a rule goes, called before anything is written)."""
    del cfg


def tensor_renamer(cfg: ModelConfig) -> Callable[[str], str]:
    """The exported name of each of our tensors: Mixtral's, or ours under ``model.`` for the shipped
    modeling file (``lm_head.weight`` stays at the top)."""
    return remote_tensor_name if needs_remote_code(cfg) else hf_tensor_name


def remote_tensor_name(name: str) -> str:
    """The name of one of our tensors in an export with its own modeling file: ours under ``model.``."""
    return name if name == "lm_head.weight" else "model." + name


def remote_code_config(cfg: ModelConfig, dtype: torch.dtype, eos_id: Optional[int],
                       info: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of an export whose model is ``modeling_moe_dist.py`` (``auto_map``)."""
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "num_experts", "expert_type",
              "shared_expert", "max_seq_len", "rope_theta", "norm_eps", "embed_scale", "fused_qkv",
              "rope_layout")
    return {"architectures": ["MoEDistForCausalLM"], "model_type": "moe_dist",
            "auto_map": {"AutoConfig": f"{REMOTE_MODULE}.MoEDistConfig",
                         "AutoModelForCausalLM": f"{REMOTE_MODULE}.MoEDistForCausalLM"},
            **{k: getattr(cfg, k) for k in fields}, "num_experts_per_tok": cfg.top_k,
            "tie_word_embeddings": cfg.tie_embeddings, "use_cache": False,
            "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None,
            "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
            HF_MARKER: info}


def mixtral_config(cfg: ModelConfig, dtype: torch.dtype, eos_id: Optional[int], info: dict[str, Any]) -> dict[str, Any]:
    """``config.json``. Written by hand, not by the installed ``MixtralConfig``, so that transformers 4.x
    (``rope_theta``, ``torch_dtype``) and 5.x (``rope_parameters``, ``dtype``) read the same values."""
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "router_jitter_noise": 0.0,
        # Mixtral's balancing loss counts each expert's share of tokens (summing to top_k), ours its share of
        # the T*K assignments (summing to 1): the same pressure for fine-tuning is our weight / top_k.
        "router_aux_loss_coef": cfg.load_balancing_weight / cfg.top_k, "output_router_logits": False,
        "sliding_window": None, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None,
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
        HF_MARKER: info,
    }


def generation_config(eos_id: Optional[int], tokenizer_vocab: int, model_vocab: int) -> dict[str, Any]:
    """Sampling defaults of ``moe-generate`` (temperature 0.8, top-k 50); stop at our EOS; like it, never
    sample the embedding rows past the tokenizer's vocabulary (they decode to nothing)."""
    out = {"do_sample": True, "temperature": 0.8, "top_k": 50, "eos_token_id": eos_id, "pad_token_id": eos_id,
           "bos_token_id": None}
    if tokenizer_vocab < model_vocab:
        out["suppress_tokens"] = list(range(tokenizer_vocab, model_vocab))
    return out


def byte_tokenizer_files(model_max_length: int) -> dict[str, Any]:
    """A byte-level ``tokenizers`` model with :class:`ByteTokenizer`'s ids: UTF-8 byte ``b`` is id ``b``
    (spelled with GPT-2's byte-to-unicode characters, no merges), ``<|endoftext|>`` is 256. One difference:
    the literal text ``<|endoftext|>`` encodes as 256 there, as 13 bytes here."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOS_TOKEN, special=True)])
    assert tok.token_to_id(BYTE_EOS_TOKEN) == ByteTokenizer.eos_id
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BYTE_EOS_TOKEN,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters (what ``pre_tokenizers.ByteLevel`` emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + shifted)
            shifted += 1
    return out


def write_hf(ckpt: Checkpoint, out: Path, dtype: torch.dtype, max_shard: int, budget: int,
             progress: Optional[Advance]) -> int:
    """Write the export into ``out`` (an empty folder); returns the weight bytes written."""
    cfg = ckpt.config.model
    check_exportable(cfg)
    spec = ckpt.state.get("tokenizer") or {}
    if spec.get("type") == "byte":
        files = byte_tokenizer_files(cfg.max_seq_len)
    else:
        try:
            files = hf_tokenizer_files(spec)
        except DataError as e:
            raise ExportError(str(e)) from None
        if files is None:
            raise ExportError(f"{ckpt.folder}: the checkpoint holds no tokenizer files and its tokenizer folder "
                              f"{spec.get('path') or ckpt.config.data.tokenizer!r} is gone; --format hf needs them: pass the "
                              "tokenizer with --tokenizer DIR")
    eos = spec.get("eos_id")
    write_tokenizer_files(files, out)  # first: the weights and configs below win any name clash
    total, _ = write_safetensors_shards(ckpt, out, dtype, max_shard, budget, progress, rename=tensor_renamer(cfg))
    info = {"step": ckpt.step, "tokens": ckpt.state.get("tokens"), "source": ckpt.folder.name, "format_version": 1}
    remote = needs_remote_code(cfg)
    if remote:
        (out / f"{REMOTE_MODULE}.py").write_text((Path(__file__).parent / "hf_modeling.py").read_text())
    config = (remote_code_config if remote else mixtral_config)(cfg, dtype, eos, info)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = generation_config(eos, int(spec.get("vocab_size") or cfg.vocab_size), cfg.vocab_size)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return total
