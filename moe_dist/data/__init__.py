"""The data pipeline: documents -> tokenizer -> disjoint packed blocks -> train/val, and the resumable sampler.

    corpus.py     load_documents(cfg): built-in stdlib corpus, local .txt/.json/.jsonl/.parquet, or a hub dataset
    tokenizer.py  ByteTokenizer, HFTokenizer (local directory only), load_tokenizer, tokenizer_from_spec
    packing.py    token stream with EOS after each document, disjoint blocks of seq_len+1, train/val split
    sampler.py    GlobalCursorSampler: global batches from (seed, epoch, cursor); rank_share splits one batch
    store.py      the token store: flat token file + JSON header; TokenWriter, TokenStore (memory map), BlockSet
    prepare.py    ensure_store: prepare once per machine (lock, atomic publish), moe-prepare-data
    loader.py     build_data -> DataBundle (blocks of the store), iter_val_batches

No torch.distributed here: ranks and world sizes are passed in as integers. ``datasets`` and
``transformers`` are imported only when a data file, hub dataset or HF tokenizer is used.
"""

from .errors import DataError
from .loader import DataBundle, build_data, iter_val_batches
from .packing import pack_blocks, pack_documents, split_indices, split_train_val, token_stream
from .sampler import GlobalCursorSampler
from .store import BlockSet, TokenStore
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_from_spec

__all__ = [
    "DataError", "DataBundle", "build_data", "iter_val_batches", "pack_blocks", "pack_documents",
    "split_indices", "split_train_val", "token_stream", "GlobalCursorSampler", "BlockSet", "TokenStore",
    "ByteTokenizer", "HFTokenizer", "load_tokenizer", "tokenizer_from_spec",
]
