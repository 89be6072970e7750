"""One rank's data start-up, old in-memory path or token store: ``python -m benchmarks.data_worker``.

``--mode old`` repeats what ``build_data`` did before the token store, with the same functions:
every document read into Python strings, one int64 token stream, int64 blocks, the split. ``--mode
store`` is today's ``build_data`` on a prepared store. Both then draw ``--batches`` global batches
from the sampler and read this rank's share, as training does. Prints one JSON line: seconds to
the first batch, and peak RSS before (imports) and after.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["old", "store"], required=True)
    p.add_argument("--data-files", nargs="+", required=True)
    p.add_argument("--store-dir", required=True)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=12)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=2)
    a = p.parse_args()

    from moe_dist.config import DataConfig
    from moe_dist.data import ByteTokenizer, GlobalCursorSampler, build_data, pack_blocks, split_train_val, token_stream
    from moe_dist.data.corpus import load_documents

    cfg = DataConfig(data_files=a.data_files, store_dir=a.store_dir)
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if a.mode == "old":
        stream = token_stream(load_documents(cfg), ByteTokenizer())
        train, _ = split_train_val(pack_blocks(stream, a.seq_len), cfg.val_fraction, 1234)
        del stream
    else:
        train = build_data(cfg, a.seq_len, 1234).train_blocks
    sampler = GlobalCursorSampler(len(train), a.global_batch, 1234)

    def read_share() -> int:
        idx = sampler.rank_share(sampler.next_global_batch(), a.rank, a.world, a.global_batch // a.world)[0]
        return int(train[idx].sum())

    read_share()
    seconds = time.perf_counter() - t0
    for _ in range(a.batches - 1):
        read_share()
    print(json.dumps({"mode": a.mode, "seconds_to_first_batch": seconds, "rss_after_imports_mb": rss_imports,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "train_blocks": len(train)}))


if __name__ == "__main__":
    main()
