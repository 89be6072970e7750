"""Tokenizers: a dependency-free byte tokenizer and a wrapper for a local Hugging Face tokenizer.

Both expose ``vocab_size``, ``eos_id``, ``encode``, ``encode_batch``, ``decode`` and ``to_spec()``;
``to_spec()`` is JSON-able and ``tokenizer_from_spec`` rebuilds the tokenizer, so a checkpoint can
record which tokenizer its model was trained with. The spec is self-contained: a Hugging Face
tokenizer's spec carries its files (``save_pretrained`` output) under ``"files"``, so checkpoints
and exports work after the original folder is gone. Nothing here downloads.
"""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from .errors import DataError


class ByteTokenizer:
    """ids 0-255 are the UTF-8 bytes, 256 is EOS (the document separator)."""

    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; EOS is skipped and invalid UTF-8 becomes U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_spec(self) -> dict[str, Any]:
        return {"type": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class HFTokenizer:
    """A Hugging Face tokenizer read from a local directory (``local_files_only``: never downloads)."""

    def __init__(self, path: str) -> None:
        self._files_dir: Optional[tempfile.TemporaryDirectory] = None  # keeps embedded files while in use
        given, path = path, os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(path):
            raise DataError(f"tokenizer {given}: no such directory (hub names are not downloaded); pass 'byte' or a "
                            "local Hugging Face tokenizer folder, e.g. one written by "
                            "AutoTokenizer.from_pretrained(name).save_pretrained(dir) on a machine with a network")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any loading problem becomes one line
            first = str(e).strip().splitlines()[0].rstrip(" :") if str(e).strip() else ""
            raise DataError(f"tokenizer {path}: cannot load it as a Hugging Face tokenizer "
                            f"({e.__class__.__name__}: {first}); the folder needs tokenizer.json "
                            "or tokenizer_config.json") from None
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is None:
            raise DataError(f"tokenizer {path}: has neither an eos_token nor a sep_token to separate documents; "
                            "add one (tokenizer.add_special_tokens({'eos_token': '</s>'}) then save_pretrained)")
        self.path = path
        self._tok = tok
        self.eos_id = int(eos)
        self.vocab_size = len(tok)  # includes added tokens, unlike tok.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: documents longer than model_max_length are expected here (they get packed).
        return self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.eos_id])

    def files(self) -> dict[str, Any]:
        """The tokenizer's ``save_pretrained`` files, JSON-able (see :func:`write_tokenizer_files`)."""
        with tempfile.TemporaryDirectory(prefix="moe_dist_tokenizer_") as d:
            self._tok.save_pretrained(d)
            return read_tokenizer_files(Path(d))

    def to_spec(self) -> dict[str, Any]:
        """``path`` says where it was loaded from; ``files`` make the spec work without that folder."""
        return {"type": "hf", "path": self.path, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "files": self.files()}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def read_tokenizer_files(folder: Path) -> dict[str, Any]:
    """Every file of ``folder`` (not recursive): ``{name: text}``, or ``{name: {"base64": ...}}`` for a
    file that is not UTF-8 (a SentencePiece model)."""
    files: dict[str, Any] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            data = p.read_bytes()
            try:
                files[p.name] = data.decode("utf-8")
            except UnicodeDecodeError:
                files[p.name] = {"base64": base64.b64encode(data).decode("ascii")}
    return files


def write_tokenizer_files(files: dict[str, Any], folder: Path) -> list[str]:
    """Write what :func:`read_tokenizer_files` read into ``folder``; returns the names written."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"tokenizer spec: file name {name!r} is not a plain file name; the spec is corrupt")
        data = base64.b64decode(content["base64"]) if isinstance(content, dict) else str(content).encode("utf-8")
        (folder / name).write_bytes(data)
    return sorted(files)


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(spec: str) -> Tokenizer:
    """``'byte'`` or the path of a local Hugging Face tokenizer directory."""
    if spec.strip().lower() == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint recorded with ``to_spec()``: from its embedded ``files`` when it
    has them, else from ``path`` (checkpoints written before files were embedded). Checks vocab size
    and EOS still match."""
    kind = spec.get("type")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "hf" and spec.get("files"):
        tok = _from_files(spec)
    elif kind == "hf":
        if not spec.get("path"):
            raise DataError(f"tokenizer spec {_short(spec)}: type 'hf' needs 'files' or a 'path'")
        if not os.path.isdir(spec["path"]):
            raise DataError(f"tokenizer {spec['path']}: no such directory, and this checkpoint was written before "
                            "tokenizers were stored in it; pass the tokenizer folder (moe-generate --tokenizer DIR)")
        tok = HFTokenizer(spec["path"])
    else:
        raise DataError(f"tokenizer spec {_short(spec)}: unknown type {kind!r}; expected 'byte' or 'hf'")
    for key in ("vocab_size", "eos_id"):
        if key in spec and spec[key] != getattr(tok, key):
            raise DataError(f"tokenizer {tok!r}: {key} is {getattr(tok, key)} but the checkpoint recorded "
                            f"{spec[key]}; the tokenizer files changed since the checkpoint was written")
    return tok


def _short(spec: dict[str, Any]) -> str:
    return repr({k: v for k, v in spec.items() if k != "files"})


def _from_files(spec: dict[str, Any]) -> HFTokenizer:
    """An HFTokenizer from the files embedded in ``spec``, written to a private temporary folder that
    lives as long as the tokenizer."""
    tmp = tempfile.TemporaryDirectory(prefix="moe_dist_tokenizer_")
    try:
        write_tokenizer_files(spec["files"], Path(tmp.name))
        tok = HFTokenizer(tmp.name)
    except DataError as e:
        tmp.cleanup()
        raise DataError(f"the tokenizer embedded in the checkpoint (trained from {spec.get('path')}) does not load: "
                        f"{e}; pass another one with --tokenizer") from None
    tok._files_dir = tmp
    tok.path = spec.get("path") or tok.path
    return tok


def hf_tokenizer_files(spec: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The Hugging Face tokenizer files of a spec: the embedded ones, else those of its ``path`` when that
    folder still loads, else None (a byte spec, or an old checkpoint whose tokenizer folder is gone)."""
    if spec.get("type") != "hf":
        return None
    if spec.get("files"):
        return spec["files"]
    if spec.get("path") and os.path.isdir(spec["path"]):
        return HFTokenizer(spec["path"]).files()
    return None
