"""Load a moe_dist checkpoint, in any of its forms, into a model; sample text from it.

::

    from moe_dist import load_model_for_inference
    model, cfg, step = load_model_for_inference("runs/x/checkpoints/checkpoint_latest")

    moe-generate runs/x/checkpoints/checkpoint_latest --prompt "Once upon a time" --max-new-tokens 64

Accepted paths:

* a DCP training checkpoint: ``checkpoint_step_<N>``, ``checkpoint_latest`` or a run folder (its
  newest complete checkpoint). The manifest is verified, then the ``model.*`` tensors are read by
  DCP straight into the model's parameters (no full copy of the model in memory);
* a consolidated ``.pt`` (``moe-consolidate``), read with ``torch.load(weights_only=True, mmap=True)``:
  a file that holds anything but tensors and plain containers is refused, never unpickled;
* a safetensors export: a ``.safetensors`` file, a ``model.safetensors.index.json``, or their folder
  (with ``moe_dist_config.json`` beside them for the config, step and tokenizer);
* a seed trainer checkpoint (``checkpoint_step_<N>.pt``): read safely by ``moe_dist.seed``, its step
  the seed's own (micro-batches).

Generation (``export/generation.py``) keeps a KV cache: the prompt is run once, then each new token
is one position; ``moe-generate`` streams the text as it comes and reports its start-up, time to
first token and tokens/s on stderr.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..cli_args import Parser
from ..checkpoint import layout
from ..checkpoint.errors import CheckpointError
from ..config import RunConfig
from ..checkpoint.keys import model_key, param_name
from ..checkpoint.train_state import run_config
from .generation import GenerationTimes, generate  # noqa: F401 - generate: moe_dist's public sampling call
from .hf import is_hf_export
from .safetensors_writer import MOE_CONFIG, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, safetensors_files


@dataclass
class CheckpointInfo:
    kind: str                 # "dcp", "pt" or "safetensors"
    path: Path                # the resolved checkpoint folder or file
    step: int
    config: dict[str, Any]    # RunConfig.to_dict() of the run that wrote it
    metrics: dict[str, Any]
    tokenizer: dict[str, Any]  # tokenizer spec (may be empty: then config.data.tokenizer)
    source: Any = None        # Checkpoint (dcp), the loaded dict (pt) or the weight files (safetensors)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def _read_pt(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        from ..seed.load import unsafe_global

        named = f" (here {unsafe_global(e)})" if unsafe_global(e) else ""
        raise CheckpointError(f"{path}: refused: it pickles objects other than tensors and plain containers{named}, "
                              "which could run code when loaded (torch.load(weights_only=True) stopped at: "
                              f"{_first_line(e)}); only load it with weights_only=False if you trust its origin, "
                              "or re-export it with moe-consolidate") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable .pt file ({e.__class__.__name__}: {_first_line(e)})") from None
    if not (isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict)
            and isinstance(obj.get("config"), dict)):
        raise CheckpointError(f"{path}: not a moe-consolidate .pt (expected a dict with 'model_state_dict' and "
                              "'config'); consolidate the DCP checkpoint with moe-consolidate")
    return obj


def _safetensors_info(path: Path) -> CheckpointInfo:
    folder = path.parent if path.is_file() else path
    files = [path] if path.suffix == ".safetensors" else safetensors_files(folder, path if path.is_file() else None)
    cfg_path = folder / MOE_CONFIG
    if not cfg_path.exists() and is_hf_export(folder):
        raise CheckpointError(f"{folder}: a --format hf export (Mixtral names, no {MOE_CONFIG}); load it with "
                              "transformers.AutoModelForCausalLM.from_pretrained, or use the .pt / safetensors export")
    try:
        info = json.loads(cfg_path.read_text())
        config = info["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: needed beside the safetensors weights for the model config "
                              f"({e.__class__.__name__}: {_first_line(e)}); export with moe-consolidate") from None
    return CheckpointInfo("safetensors", folder, int(info.get("step") or 0), config, info.get("metrics") or {},
                          info.get("tokenizer") or {}, files)


def checkpoint_info(path: str | Path, verify: bool = True) -> CheckpointInfo:
    """Identify what ``path`` is and read its step, config, metrics and tokenizer spec (no weights yet).
    ``verify`` checks a DCP checkpoint's manifest (sizes and checksums)."""
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        raise CheckpointError(f"{path}: no such file or folder")
    if p.is_file():
        if p.suffix == ".safetensors" or p.name.endswith(".index.json"):
            return _safetensors_info(p)
        if not zipfile.is_zipfile(p) and p.suffix not in (".pt", ".pth"):
            raise CheckpointError(f"{path}: not a checkpoint (expected a DCP folder, a .pt or a safetensors export)")
        from ..seed.load import looks_like_seed

        if looks_like_seed(p):  # the seed trainer's checkpoint_step_<N>.pt (moe_dist/seed/)
            from ..seed.importer import as_export

            obj = as_export(p)
            return CheckpointInfo("pt", p, obj["step"], obj["config"], obj["metrics"], {}, obj)
        obj = _read_pt(p)
        return CheckpointInfo("pt", p, int(obj.get("step") or 0), obj["config"], obj.get("metrics") or {},
                              obj.get("tokenizer") or {}, obj)
    exported = (p / SAFETENSORS_SINGLE).is_file() or (p / SAFETENSORS_INDEX).is_file()
    if exported and not (p / layout.DCP_METADATA).exists():
        return _safetensors_info(p)
    from ..checkpoint.reader import Checkpoint  # DCP: imported only for a DCP checkpoint

    ckpt = Checkpoint(p, verify=verify)
    state = ckpt.state
    return CheckpointInfo("dcp", ckpt.folder, ckpt.step, state["config"], state.get("metrics") or {},
                          state.get("tokenizer") or {}, ckpt)


def _stored_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict entries that own their storage (a tied head is left to its embedding)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _check_match(where: Path, entries: dict[str, torch.Tensor], found: dict[str, tuple[int, ...]]) -> None:
    """Raise one CheckpointError naming what differs between the model and the checkpoint."""
    missing = [k for k in entries if k not in found]
    extra = [k for k in found if k not in entries]
    wrong = [f"{k} {list(found[k])} vs model {list(t.shape)}" for k, t in entries.items() if k in found
             and tuple(found[k]) != tuple(t.shape)]
    problems = [f"{what}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                for what, keys in (("missing", missing), ("unexpected", extra), ("shape", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{where}: the model does not match the checkpoint ({'; '.join(problems)}); "
                              "build it from the checkpoint's config (load_model_for_inference)")


@torch.no_grad()
def _load_weights(info: CheckpointInfo, model: nn.Module) -> None:
    entries = _stored_entries(model)
    if info.kind == "dcp":
        ckpt = info.source  # a checkpoint.reader.Checkpoint
        found = {param_name(k): tuple(md.size) for k, md in ckpt.metadata.items() if param_name(k) is not None}
        _check_match(info.path, model.state_dict(keep_vars=True), found)  # every name, a tied head too
        # DCP copies the chunks straight into the parameters: no second copy of the model.
        ckpt.load({model_key(k): t.detach() for k, t in entries.items()})
    elif info.kind == "pt":
        sd = info.source["model_state_dict"]  # every state_dict key, the tied head too
        _check_match(info.path, model.state_dict(keep_vars=True), {k: tuple(t.shape) for k, t in sd.items()})
        for k, t in entries.items():
            t.detach().copy_(sd[k])
    else:
        from safetensors import safe_open

        found = {}
        for path in info.source:
            try:
                with safe_open(str(path), "pt") as f:
                    found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except Exception as e:  # noqa: BLE001 - SafetensorError and friends become one line
                raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None
        _check_match(info.path, entries, found)
        for path in info.source:
            with safe_open(str(path), "pt") as f:
                for k in f.keys():
                    entries[k].detach().copy_(f.get_tensor(k))


def load_checkpoint(path: str | Path, model: nn.Module, device: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Load the weights at ``path`` (DCP folder, ``checkpoint_latest``, ``.pt`` or safetensors) into
    ``model``, moved to ``device`` first. Returns ``(step, config dict, metrics dict)``."""
    info = checkpoint_info(path, verify=verify)
    _load_weights(info, model.to(device))
    return info.step, info.config, info.metrics


def _build(info: CheckpointInfo, device: str | torch.device) -> tuple[nn.Module, RunConfig]:
    from .. import model as lm

    cfg = run_config(info.config, info.path)
    model = lm.build(cfg.model, device)
    _load_weights(info, model)
    return model.eval(), cfg


def load_model_for_inference(path: str | Path, device: str | torch.device = "cpu",
                             verify: bool = True) -> tuple[nn.Module, RunConfig, int]:
    """Build the model from the checkpoint's stored config on ``device``, load its weights,
    eval mode. Returns ``(model, RunConfig, step)``."""
    info = checkpoint_info(path, verify=verify)
    model, cfg = _build(info, device)
    return model, cfg, info.step


# ============================================================================ generation
def build_generate_parser() -> argparse.ArgumentParser:
    p = Parser(prog="moe-generate", description="Sample text from a moe_dist checkpoint (DCP folder, "
                                "checkpoint_latest, consolidated .pt or safetensors export) with its own tokenizer.")
    p.add_argument("checkpoint", help="checkpoint folder, checkpoint_latest, run folder, .pt or safetensors export")
    p.add_argument("--prompt", default="", help="text to continue (empty: start after a document separator)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to sample at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    p.add_argument("--tokenizer", help="'byte' or a local Hugging Face tokenizer folder, instead of the tokenizer "
                   "stored with the checkpoint")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="the end-of-document token cannot be drawn before this many new tokens (default 0)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="go on past the end-of-document token (kept in the text as a separator): exactly "
                   "--max-new-tokens tokens, e.g. to time a long generation")
    p.add_argument("--no-cache", action="store_true",
                   help="re-run the whole context for every token instead of using the KV cache (the reference; slow)")
    p.add_argument("--no-stream", action="store_true", help="print the text once at the end, not as it is sampled")
    p.add_argument("--set", metavar="model.max_seq_len=N", action="append", default=[],
                   help="a longer context than the checkpoint's (rotary positions need no weights); the only field "
                   "generation may change")
    return p


def _with_longer_context(config: dict[str, Any], items: list[str]) -> dict[str, Any]:
    from ..config import ConfigError, parse_set_args

    try:
        over = parse_set_args(items)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    other = [k for k in over if k != "model.max_seq_len"]
    if other:
        raise CheckpointError(f"--set {other[0]}: generation can only change model.max_seq_len (the other fields "
                              "are the checkpoint's architecture)")
    if not over:
        return config
    try:
        n = int(over["model.max_seq_len"])
    except ValueError:
        raise CheckpointError(f"--set model.max_seq_len={over['model.max_seq_len']}: expected a whole number") from None
    return {**config, "model": {**config["model"], "max_seq_len": n}}


class _Stream:
    """Writes the decoded text as tokens come, holding back a tail that is not whole characters yet."""

    def __init__(self, tok: Any, enabled: bool) -> None:  # noqa: ANN401 - a Tokenizer
        self.tok, self.enabled, self.ids, self.shown = tok, enabled, [], 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        if self.enabled:
            text = self.tok.decode(self.ids)
            if not text.endswith("\ufffd") and len(text) > self.shown:
                sys.stdout.write(text[self.shown:])
                sys.stdout.flush()
                self.shown = len(text)

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        sys.stdout.write((text[self.shown:] if self.enabled else text) + "\n")
        sys.stdout.flush()


def generate_main(argv: Optional[list[str]] = None) -> int:
    from rich.console import Console
    from rich.markup import escape

    from ..data.errors import DataError
    from ..data.tokenizer import load_tokenizer, tokenizer_from_spec
    from ..debug import strict_device_from_env

    import time

    started = time.perf_counter()
    a = build_generate_parser().parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        info = checkpoint_info(a.checkpoint)
        info.config = _with_longer_context(info.config, a.set)
        model, cfg = _build(info, a.device)
        strict_device_from_env()  # tests: generation names every device (see moe_dist.debug)
        if a.tokenizer:
            tok = load_tokenizer(a.tokenizer)
        elif info.tokenizer.get("type"):
            tok = tokenizer_from_spec(info.tokenizer)
        else:  # written before checkpoints recorded their tokenizer
            tok = load_tokenizer(cfg.data.tokenizer)
    except (CheckpointError, DataError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    if tok.vocab_size > cfg.model.vocab_size:
        err.print(f"[red]error:[/] tokenizer {escape(repr(tok))} has {tok.vocab_size} ids, the model only "
                  f"{cfg.model.vocab_size}; pass the tokenizer it was trained with (--tokenizer)")
        return 2
    prompt = tok.encode(a.prompt) or [tok.eos_id]
    gen = torch.Generator(device="cpu").manual_seed(a.seed)  # sampling draws on the host
    loaded = time.perf_counter() - started  # since this function began; the interpreter's start is not in it
    stream, times = _Stream(tok, not a.no_stream), GenerationTimes()
    sys.stdout.write(a.prompt)
    ids = generate(model, prompt, a.max_new_tokens, a.temperature, a.top_k or None, gen, tok.eos_id, tok.vocab_size,
                   min_new_tokens=a.min_new_tokens, ignore_eos=a.ignore_eos, use_cache=not a.no_cache,
                   on_token=stream, times=times)
    stream.finish()
    err.print(f"[dim]{info.kind} checkpoint, step {info.step}, {len(ids)} new tokens; load {loaded:.2f} s, first "
              f"token {times.first_token_s:.3f} s, {times.tokens_per_s:.1f} tokens/s"
              f"{' (no KV cache)' if a.no_cache else ''}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(generate_main())
