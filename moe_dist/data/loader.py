"""Build the data of a run: the token store -> disjoint blocks -> train / validation.

``build_data`` is called identically on every rank and is deterministic: every rank opens the same
token store (``prepare.ensure_store``: prepared once per machine on first use) and derives the
same split. Blocks are read from the store's memory map one batch at a time, so no rank holds the
corpus; ranks then pick their share of each global batch (``sampler.rank_share``) and their own
slice of the validation set (``iter_val_batches``). Nothing here knows about process groups.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Optional

import torch

from ..config import DataConfig
from ..logging_utils import get_logger
from .errors import DataError
from .packing import split_indices
from .prepare import ensure_store
from .store import BlockSet, TokenStore
from .tokenizer import Tokenizer, load_tokenizer


@dataclass
class DataBundle:
    train_blocks: BlockSet  # [N_train, seq_len + 1]: indexing gives int64 CPU tensors
    val_blocks: BlockSet  # [N_val, seq_len + 1], no block shared with train
    tokenizer: Tokenizer
    store: TokenStore
    stats: dict = field(default_factory=dict)  # documents, tokens, seconds: for logs, not for resuming

    @cached_property
    def fingerprint(self) -> dict:
        """What a checkpoint records of its data, so a resume on other data is refused (see
        :func:`data_fingerprint`)."""
        return data_fingerprint(self.store.sha256, self.train_blocks.width, len(self.train_blocks),
                                self.val_blocks.rows)

    def fingerprint_like(self, saved: Optional[dict]) -> dict:
        """The fingerprint to compare with a checkpoint's ``saved`` one: the legacy kind for a checkpoint
        written before token stores (no ``store_sha256``), else :attr:`fingerprint`."""
        if saved and "store_sha256" not in saved:
            return legacy_fingerprint(self.train_blocks, self.val_blocks)
        return self.fingerprint


LEGACY_SAMPLES = 2048  # blocks per split hashed by the fingerprint of checkpoints written before token stores


def legacy_fingerprint(train_blocks: "BlockSet | torch.Tensor", val_blocks: "BlockSet | torch.Tensor") -> dict:
    """The fingerprint checkpoints recorded before token stores: block counts, block length and a
    SHA-256 over up to 2048 evenly spaced blocks of each split. Computed from the store's blocks, it
    equals the old one for the same data, so those checkpoints still resume."""
    digest = hashlib.sha256()
    for blocks in (train_blocks, val_blocks):
        n, width = blocks.shape[0], blocks.shape[1]
        idx = torch.linspace(0, n - 1, min(n, LEGACY_SAMPLES), device="cpu").round().long()
        digest.update(f"{n}x{width}|".encode())
        digest.update(blocks[idx].to(torch.int64).contiguous().numpy().tobytes())
    return {"train_blocks": int(train_blocks.shape[0]), "val_blocks": int(val_blocks.shape[0]),
            "block_tokens": int(train_blocks.shape[1]), "sha256": digest.hexdigest()}


def data_fingerprint(store_sha256: str, block_tokens: int, train_blocks: int, val_rows: torch.Tensor) -> dict:
    """Block counts, block length, the store's SHA-256 (of every token, computed when it was written)
    and a SHA-256 over that, the block length and which blocks are validation (the split).

    The data cursor in a checkpoint is a position in a seeded permutation of the training blocks;
    it only means "continue where it stopped" over the same blocks. Another corpus, tokenizer,
    seq_len, val_fraction or seed changes the blocks, and resuming would silently replay or skip data."""
    digest = hashlib.sha256(f"{store_sha256}|{block_tokens}|{train_blocks}|".encode())
    digest.update(val_rows.to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes())
    return {"train_blocks": int(train_blocks), "val_blocks": int(val_rows.numel()), "block_tokens": int(block_tokens),
            "store_sha256": store_sha256, "sha256": digest.hexdigest()}


def check_same_data(saved: Optional[dict], current: dict, where: str) -> None:
    """Raise DataError naming what differs when a checkpoint's data fingerprint is not ``current``.

    ``saved`` None (a checkpoint written before fingerprints) passes."""
    if not saved or saved == current:
        return
    diffs = [f"{k}: saved {saved.get(k)}, now {current[k]}" for k in ("train_blocks", "val_blocks", "block_tokens")
             if saved.get(k) != current[k]]
    if not diffs and saved.get("store_sha256") != current.get("store_sha256"):
        diffs = [f"other token store contents (store sha256 saved {str(saved.get('store_sha256'))[:12]}…, "
                 f"now {str(current.get('store_sha256'))[:12]}…)"]
    if not diffs:
        diffs = [f"same block counts but other contents (sha256 saved {str(saved.get('sha256'))[:12]}…, "
                 f"now {current['sha256'][:12]}…)"]
    raise DataError(f"{where}: the training data differs from the checkpoint's ({'; '.join(diffs)}). The saved "
                    "data position only means something on the same data: resume with the same data.files / "
                    "data.dataset, data.tokenizer, train.seq_len, data.val_fraction and train.seed, or start a "
                    "new run")


def build_data(data_cfg: DataConfig, seq_len: int, seed: int) -> DataBundle:
    t0 = time.perf_counter()
    if seq_len <= 0:
        raise DataError(f"train.seq_len: expected a positive integer, found {seq_len}")
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    store = ensure_store(data_cfg, tokenizer)
    width = seq_len + 1
    n = store.num_tokens // width
    if n < 2:
        raise DataError(f"the corpus has {store.num_tokens} tokens: fewer than 2 blocks of seq_len+1 = {width} tokens "
                        "(one for training, one for validation); use more data or a smaller train.seq_len")
    train_rows, val_rows = split_indices(n, data_cfg.val_fraction, seed)
    train, val = BlockSet(store, width, train_rows), BlockSet(store, width, val_rows)
    stats = {"documents": int(store.header["documents"]), "tokens": store.num_tokens, "blocks": n,
             "seconds": time.perf_counter() - t0}
    get_logger().info(f"data: {stats['documents']:,} documents, {stats['tokens']:,} tokens in {store.path} -> "
                      f"{len(train)} train / {len(val)} val blocks of {seq_len}+1 ({stats['seconds']:.2f}s)")
    return DataBundle(train_blocks=train, val_blocks=val, tokenizer=tokenizer, store=store, stats=stats)


def iter_val_batches(val_blocks: "BlockSet | torch.Tensor", rank: int, world_size: int, micro_batch_size: int,
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
    n = len(val_blocks)
    if n == 0:
        return
    size = n if max_batches is None else min(n, max_batches * micro_batch_size)
    sample = val_blocks[:size]  # [size, seq_len + 1], read now (a store's blocks: from the map)
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
