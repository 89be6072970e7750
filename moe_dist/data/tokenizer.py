"""Tokenizers: a dependency-free byte tokenizer and a wrapper for a local Hugging Face tokenizer.

Both expose ``vocab_size``, ``eos_id``, ``encode``, ``encode_batch``, ``decode`` and ``to_spec()``;
``to_spec()`` is JSON-able and ``tokenizer_from_spec`` rebuilds the tokenizer, so a checkpoint can
record which tokenizer its model was trained with. Nothing here downloads.
"""

from __future__ import annotations

import os
from typing import Any, Union

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

    def to_spec(self) -> dict[str, Any]:
        return {"type": "hf", "path": self.path, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(spec: str) -> Tokenizer:
    """``'byte'`` or the path of a local Hugging Face tokenizer directory."""
    if spec.strip().lower() == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint recorded with ``to_spec()``; checks vocab size and EOS still match."""
    kind = spec.get("type")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "hf":
        if not spec.get("path"):
            raise DataError(f"tokenizer spec {spec!r}: type 'hf' needs a 'path'")
        tok = HFTokenizer(spec["path"])
    else:
        raise DataError(f"tokenizer spec {spec!r}: unknown type {kind!r}; expected 'byte' or 'hf'")
    for key in ("vocab_size", "eos_id"):
        if key in spec and spec[key] != getattr(tok, key):
            raise DataError(f"tokenizer {tok!r}: {key} is {getattr(tok, key)} but the checkpoint recorded "
                            f"{spec[key]}; the tokenizer files changed since the checkpoint was written")
    return tok
