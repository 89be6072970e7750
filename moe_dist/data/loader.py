"""Build the data of a run: documents -> tokens -> disjoint blocks -> train / validation.

``build_data`` is called identically on every rank and is deterministic, so every rank holds the
same blocks; ranks then pick their share of each global batch (``sampler.rank_share``) and their
own slice of the validation set (``iter_val_batches``). Nothing here knows about process groups.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Optional

import torch

from ..config import DataConfig
from ..logging_utils import get_logger, warn_once
from .corpus import load_documents
from .errors import DataError
from .packing import pack_blocks, split_train_val, token_stream
from .tokenizer import Tokenizer, load_tokenizer


@dataclass
class DataBundle:
    train_blocks: torch.Tensor  # [N_train, seq_len + 1] long
    val_blocks: torch.Tensor  # [N_val, seq_len + 1] long, no block shared with train
    tokenizer: Tokenizer
    stats: dict = field(default_factory=dict)  # documents, tokens, seconds: for logs, not for resuming

    @cached_property
    def fingerprint(self) -> dict:
        """What a checkpoint records of its data, so a resume on other data is refused (see
        :func:`data_fingerprint`)."""
        return data_fingerprint(self.train_blocks, self.val_blocks)


FINGERPRINT_SAMPLES = 2048  # blocks hashed per split: cheap on any corpus, and catches other files


def data_fingerprint(train_blocks: torch.Tensor, val_blocks: torch.Tensor) -> dict:
    """Block counts, block length and a SHA-256 over up to ``FINGERPRINT_SAMPLES`` evenly spaced
    blocks of each split (all of them for small data).

    The data cursor in a checkpoint is a position in a seeded permutation of the training blocks;
    it only means "continue where it stopped" over the same blocks. Another corpus, tokenizer,
    seq_len or val_fraction changes the blocks, and resuming would silently replay or skip data.
    Hashing a sample instead of every block keeps this O(1) in the corpus size."""
    digest = hashlib.sha256()
    for blocks in (train_blocks, val_blocks):
        n = blocks.size(0)
        idx = torch.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLES), device="cpu").round().long()
        digest.update(f"{n}x{blocks.size(1) if blocks.dim() == 2 else 0}|".encode())
        digest.update(blocks[idx].to(torch.int64).contiguous().numpy().tobytes())
    return {"train_blocks": int(train_blocks.size(0)), "val_blocks": int(val_blocks.size(0)),
            "block_tokens": int(train_blocks.size(1)) if train_blocks.dim() == 2 else 0,
            "sha256": digest.hexdigest()}


def check_same_data(saved: Optional[dict], current: dict, where: str) -> None:
    """Raise DataError naming what differs when a checkpoint's data fingerprint is not ``current``.

    ``saved`` None (a checkpoint written before fingerprints) passes."""
    if not saved or saved == current:
        return
    diffs = [f"{k}: saved {saved.get(k)}, now {current[k]}" for k in ("train_blocks", "val_blocks", "block_tokens")
             if saved.get(k) != current[k]]
    if not diffs:
        diffs = [f"same block counts but other contents (sha256 saved {str(saved.get('sha256'))[:12]}…, "
                 f"now {current['sha256'][:12]}…)"]
    raise DataError(f"{where}: the training data differs from the checkpoint's ({'; '.join(diffs)}). The saved "
                    "data position only means something on the same data: resume with the same data.files / "
                    "data.dataset, data.tokenizer, train.seq_len, data.val_fraction and train.seed, or start a "
                    "new run")


def build_data(data_cfg: DataConfig, seq_len: int, seed: int) -> DataBundle:
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    documents = load_documents(data_cfg)
    stream = token_stream(documents, tokenizer)
    blocks = pack_blocks(stream, seq_len)
    train, val = split_train_val(blocks, data_cfg.val_fraction, seed)
    stats = {"documents": len(documents), "tokens": int(stream.size), "blocks": int(blocks.size(0)),
             "seconds": time.perf_counter() - t0}
    get_logger().info(f"data: {stats['documents']} documents, {stats['tokens']:,} tokens -> {train.size(0)} train / "
                      f"{val.size(0)} val blocks of {seq_len}+1 ({stats['seconds']:.2f}s)")
    return DataBundle(train_blocks=train, val_blocks=val, tokenizer=tokenizer, stats=stats)


def iter_val_batches(val_blocks: torch.Tensor, rank: int, world_size: int, micro_batch_size: int,
                     max_batches: Optional[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets), each ``[B, seq_len]``, from this rank's contiguous slice of the validation set.

    Every rank yields the same number of batches of the same shape (validation forwards may run
    collectives), the slices of different ranks are disjoint, and every call yields the same batches.
    ``max_batches`` caps the batches per rank (None = the whole slice).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    n = val_blocks.size(0)
    per_rank = n // world_size
    if per_rank == 0:
        # Fewer validation blocks than ranks: share blocks rather than leave a rank without a batch.
        warn_once(f"validation set has {n} blocks for {world_size} ranks; ranks share blocks "
                  "(raise data.val_fraction for a disjoint split)")
        mine = val_blocks[rank % n:rank % n + 1]
    else:
        mine = val_blocks[rank * per_rank:(rank + 1) * per_rank]
    size = min(micro_batch_size, mine.size(0))
    count = mine.size(0) // size
    if max_batches is not None:
        count = min(count, max_batches)
    for i in range(count):
        block = mine[i * size:(i + 1) * size]
        yield block[:, :-1], block[:, 1:]
