"""Tokenize documents into one stream and cut it into disjoint blocks; split blocks into train/val.

The stream is ``doc_0 EOS doc_1 EOS ... doc_n EOS``. It is cut into blocks of ``seq_len + 1``
tokens that do not overlap (a block gives ``inputs = block[:-1]``, ``targets = block[1:]``), and
the remainder shorter than a block is dropped. Train and validation are disjoint sets of whole
blocks, so no validation token is ever trained on.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DataError
from .tokenizer import ByteTokenizer, Tokenizer


def token_stream(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """All documents as one int64 array of token ids, each document followed by EOS."""
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_stream(documents, tokenizer.eos_id)
    parts: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    for ids in tokenizer.encode_batch(documents):
        parts.append(np.asarray(ids, dtype=np.int64))
        parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _byte_stream(documents: list[str], eos_id: int) -> np.ndarray:
    # No per-token Python: one join of the UTF-8 bytes, then EOS scattered in at the document ends.
    encoded = [d.encode("utf-8") for d in documents]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    raw = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    out = np.empty(raw.size + len(encoded), dtype=np.int64)
    eos_pos = np.cumsum(lengths) + np.arange(len(encoded))  # position of doc i's EOS in the output
    is_eos = np.zeros(out.size, dtype=bool)
    is_eos[eos_pos] = True
    out[is_eos] = eos_id
    out[~is_eos] = raw
    return out


def pack_blocks(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """Disjoint blocks of ``seq_len + 1`` tokens: a ``torch.long`` tensor ``[N, seq_len + 1]``."""
    if seq_len <= 0:
        raise DataError(f"train.seq_len: expected a positive integer, found {seq_len}")
    width = seq_len + 1
    n = stream.size // width
    if n < 2:
        raise DataError(f"the corpus has {stream.size} tokens: fewer than 2 blocks of seq_len+1 = {width} tokens "
                        "(one for training, one for validation); use more data or a smaller train.seq_len")
    return torch.from_numpy(np.ascontiguousarray(stream[: n * width]).reshape(n, width)).long()


def pack_documents(documents: list[str], tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    return pack_blocks(token_stream(documents, tokenizer), seq_len)


def split_indices(num_blocks: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) block indices, each sorted: a seeded permutation whose first ``max(1, round(N * f))`` are val.

    At least one block always stays in train. The two index sets are disjoint by construction.
    """
    if num_blocks < 2:
        raise DataError(f"cannot split {num_blocks} block(s) into train and validation; need at least 2")
    n_val = min(max(1, round(num_blocks * val_fraction)), num_blocks - 1)
    perm = torch.randperm(num_blocks, generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu")
    val = perm[:n_val].sort().values
    del perm
    # train = the sorted complement of val (= perm[n_val:] sorted), without sorting N values: on a
    # store of 500M tokens that sort's two N-long outputs were the biggest thing a rank allocated.
    keep = torch.ones(num_blocks, dtype=torch.bool, device="cpu")
    keep[val] = False
    return keep.nonzero().squeeze(1), val


def split_train_val(blocks: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_blocks, val_blocks): disjoint sets of whole rows of ``blocks``."""
    train_idx, val_idx = split_indices(blocks.size(0), val_fraction, seed)
    return blocks[train_idx], blocks[val_idx]
