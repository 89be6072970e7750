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
        idx = torch.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLES)).round().long() if n else torch.zeros(0).long()
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
                     max_batches: Optional[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(inputs, targets, counts), inputs/targets ``[B, seq_len]``: this rank's part of a fixed global sample.

    The sample is the first ``max_batches * micro_batch_size`` validation blocks (all of them for
    None), whatever the world size, so a loss summed over every rank's targets is the same number
    on 1, 2 or 3 ranks. Ranks take contiguous, disjoint parts that differ by at most one block, in
    batches of up to ``micro_batch_size``. Every rank yields the same number of batches
    (validation forwards may run collectives): a rank whose part is used up yields one of the
    sample's blocks again with ``counts`` False, to be run and not counted.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    n = val_blocks.size(0)
    if n == 0:
        return
    size = n if max_batches is None else min(n, max_batches * micro_batch_size)
    sample = val_blocks[:size]  # [size, seq_len + 1]
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    mine = sample[start:start + base + (1 if rank < extra else 0)]
    count = -(-(base + (1 if extra else 0)) // micro_batch_size)  # batches of the largest part
    for i in range(count):
        block = mine[i * micro_batch_size:(i + 1) * micro_batch_size]
        counts = block.size(0) > 0
        if not counts:
            block = sample[:1]
        yield block[:, :-1], block[:, 1:], counts
