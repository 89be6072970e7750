"""Unit tests of moe_dist.data: tokenizers, corpus loading and its errors, packing, split, sampler."""

from __future__ import annotations

import collections
import json
import time

import numpy as np
import pytest
import torch

from moe_dist.config import DataConfig
from moe_dist.data import (
    ByteTokenizer, DataError, GlobalCursorSampler, build_data, iter_val_batches, load_tokenizer, pack_blocks,
    split_indices, split_train_val, token_stream, tokenizer_from_spec,
)
from moe_dist.data.corpus import load_documents


# --------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🙂\n\ttab"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.decode(ids[:2] + [256] + ids[2:]) == text  # EOS is skipped anywhere
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character does not raise
    spec = json.loads(json.dumps(tok.to_spec()))
    assert isinstance(tokenizer_from_spec(spec), ByteTokenizer)


def _save_tiny_hf_tokenizer(path, eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world foo bar", "héllo wörld baz"],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    kwargs = {"eos_token": "</s>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **kwargs).save_pretrained(str(path))


def test_hf_tokenizer_from_local_directory(tmp_path):
    _save_tiny_hf_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.eos_id == 1 and tok.vocab_size == 9  # 7 words + [UNK] + </s>
    ids = tok.encode("hello wörld")
    assert len(ids) == 2 and tok.eos_id not in ids
    assert tok.decode(ids + [tok.eos_id]) == "hello wörld"
    spec = json.loads(json.dumps(tok.to_spec()))
    assert spec["type"] == "hf" and tokenizer_from_spec(spec).encode("foo bar") == tok.encode("foo bar")
    with pytest.raises(DataError, match="vocab_size"):
        tokenizer_from_spec({**spec, "vocab_size": 999})
    # Packing through the general (non-byte) path: EOS after each document.
    stream = token_stream(["hello world", "foo"], tok)
    assert stream.tolist() == tok.encode("hello world") + [1] + tok.encode("foo") + [1]


def test_hf_tokenizer_without_eos(tmp_path):
    _save_tiny_hf_tokenizer(tmp_path / "tok", eos=False)
    with pytest.raises(DataError, match="eos_token"):
        load_tokenizer(str(tmp_path / "tok"))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no/such/tok.*no such directory"):
        load_tokenizer("/no/such/tok")
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="junk.*cannot load"):
        load_tokenizer(str(tmp_path / "junk"))
    with pytest.raises(DataError, match="unknown type"):
        tokenizer_from_spec({"type": "sentencepiece"})


# --------------------------------------------------------------------------- corpus
def test_default_corpus_offline():
    docs = load_documents(DataConfig(max_corpus_bytes=200_000))
    assert len(docs) >= 5
    assert 200_000 - 4 < sum(len(d.encode("utf-8")) for d in docs) <= 200_000  # cut at the cap (a split char drops)
    assert any("def " in d for d in docs) and any("import " in d for d in docs)
    assert docs == load_documents(DataConfig(max_corpus_bytes=200_000))  # deterministic


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))


def test_data_files_load(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsecond line\n\nnew paragraph ünïcode\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["doc one", "", "doc two"])))
    pq_path = tmp_path / "c.parquet"
    _write_parquet(pq_path, [{"body": "parquet doc", "n": 1}, {"body": None, "n": 2}])
    assert load_documents(DataConfig(data_files=[str(txt)])) == [txt.read_text(encoding="utf-8")]
    docs = load_documents(DataConfig(data_files=[str(jsonl), str(pq_path)], text_field="body"))
    assert docs == ["doc one", "doc two", "parquet doc"]  # empty/null rows are dropped
    # Comma-separated string, as given on the command line.
    assert len(load_documents(DataConfig(data_files=f"{jsonl},{pq_path}", text_field="body"))) == 3


@pytest.mark.parametrize("case", ["missing", "extension", "empty", "no_text", "field", "bad_json", "not_text"])
def test_data_file_errors(tmp_path, case):
    cfg_kwargs = {}
    if case == "missing":
        path, expect = tmp_path / "nope.txt", "not found"
    elif case == "extension":
        path, expect = tmp_path / "a.csv", "unknown extension '.csv'"
        path.write_text("a,b\n")
    elif case == "empty":
        path, expect = tmp_path / "e.jsonl", "is empty"
        path.write_text("")
    elif case == "no_text":
        path, expect = tmp_path / "blank.jsonl", "no text in column 'text'"
        path.write_text(json.dumps({"text": ""}) + "\n")
    elif case == "field":
        path, expect = tmp_path / "f.parquet", "no text field 'text'; columns found: content, id"
        _write_parquet(path, [{"content": "x", "id": 1}])
    elif case == "bad_json":
        path, expect = tmp_path / "bad.json", "cannot read it as json"
        path.write_text("{not json at all")
    else:
        path, expect = tmp_path / "n.jsonl", "not text"
        path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError) as err:
        load_documents(DataConfig(data_files=[str(path)], **cfg_kwargs))
    msg = str(err.value)
    assert str(path) in msg and expect in msg and "\n" not in msg


def test_a_folder_given_as_data_file_names_the_glob(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("a.txt", "b.txt", "c.jsonl", "notes.md"):
        (tmp_path / "d" / name).write_text("x")
    with pytest.raises(DataError) as err:
        load_documents(DataConfig(data_files=[str(tmp_path / "d")]))
    d = tmp_path / "d"
    assert str(err.value) == (f"data file {d}: is a folder (1 .jsonl, 2 .txt files); --data-files takes files, "
                              f"e.g. --data-files {d}/*.txt")
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="is a folder with no .json/.jsonl/.parquet/.txt files in it"):
        load_documents(DataConfig(data_files=[str(tmp_path / "e")]))


def test_hub_dataset_offline_is_a_data_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="nobody/no-such-dataset.*network or a local copy"):
        load_documents(DataConfig(dataset="nobody/no-such-dataset"))


def test_files_and_dataset_both_set():
    with pytest.raises(DataError, match="choose one"):
        load_documents(DataConfig(data_files=["a.txt"], dataset="x/y"))


# --------------------------------------------------------------------------- packing and split
def test_byte_stream_matches_reference():
    tok = ByteTokenizer()
    docs = ["abc", "", "é日", "x" * 10]
    ref = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    assert token_stream(docs, tok).tolist() == ref


def test_packing_disjoint_prefix_blocks():
    tok = ByteTokenizer()
    docs = [f"document {i} " + "ü" * (i % 7) + "text " * (i % 13) for i in range(300)]
    stream = token_stream(docs, tok)
    seq_len = 31
    blocks = pack_blocks(stream, seq_len)
    assert blocks.dtype == torch.long and blocks.shape == (stream.size // 32, 32)
    flat = blocks.reshape(-1).numpy()
    np.testing.assert_array_equal(flat, stream[: flat.size])  # consecutive, non-overlapping, a prefix
    assert stream.size - flat.size < 32  # only the remainder is dropped
    assert (stream == tok.eos_id).sum() == len(docs)


def test_packing_too_small_names_seq_len_and_size():
    with pytest.raises(DataError, match=r"has 11 tokens.*seq_len\+1 = 9"):
        pack_blocks(token_stream(["tiny text!"], ByteTokenizer()), 8)


def test_train_val_disjoint():
    n = 101
    train_idx, val_idx = split_indices(n, 0.1, seed=7)
    assert len(val_idx) == 10 and len(train_idx) == 91
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(n))
    assert torch.equal(split_indices(n, 0.1, seed=7)[1], val_idx)
    assert not torch.equal(split_indices(n, 0.1, seed=8)[1], val_idx)
    # On the blocks themselves: no row of val is a row of train (rows are unique via a position column).
    blocks = torch.stack([torch.arange(i * 5, i * 5 + 5) for i in range(n)])
    train, val = split_train_val(blocks, 0.1, seed=7)
    assert not {tuple(r) for r in train.tolist()} & {tuple(r) for r in val.tolist()}
    assert len(split_indices(2, 0.9, seed=0)[0]) == 1  # train keeps at least one block


def test_build_data_default_corpus_is_fast(tmp_path):
    import datasets  # noqa: F401 - imported before the clock starts: what is timed is preparing, not importing

    t0 = time.perf_counter()
    data = build_data(DataConfig(store_dir=str(tmp_path)), seq_len=128, seed=1234)  # prepares the store
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"build_data took {elapsed:.2f}s"
    assert data.train_blocks.shape[1] == 129 and data.val_blocks.shape[1] == 129
    n = data.train_blocks.shape[0] + data.val_blocks.shape[0]
    assert 0 <= 4_000_000 + data.stats["documents"] - data.stats["tokens"] < 4  # bytes + one EOS per document
    assert n == data.stats["tokens"] // 129
    assert data.val_blocks.shape[0] == round(n * 0.05)
    t0 = time.perf_counter()
    again = build_data(DataConfig(store_dir=str(tmp_path)), seq_len=128, seed=1234)  # reuses it
    assert time.perf_counter() - t0 < 0.5 and again.store.path == data.store.path
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [data.store.path.name]
    # The store's blocks are the in-memory path's blocks: same stream, same split.
    blocks = pack_blocks(token_stream(load_documents(DataConfig()), ByteTokenizer()), 128)
    train_idx, val_idx = split_indices(n, 0.05, 1234)
    assert torch.equal(data.val_blocks[:], blocks[val_idx]) and data.val_blocks[:].dtype == torch.long
    pick = torch.tensor([0, 7, len(train_idx) - 1])
    assert torch.equal(data.train_blocks[pick], blocks[train_idx[pick]])
    small = DataConfig(max_corpus_bytes=50_000, store_dir=str(tmp_path))
    assert torch.equal(build_data(small, 64, 1).val_blocks[:], build_data(small, 64, 1).val_blocks[:])


def _counted_rows(batches):
    return [tuple(row) for x, y, counts in batches if counts for row in torch.cat([x, y[:, -1:]], 1).tolist()]


@pytest.mark.parametrize("max_batches", [None, 3, 100])
def test_iter_val_batches_one_global_sample_on_any_world_size(max_batches):
    val = torch.arange(23 * 9).reshape(23, 9)
    sample = [tuple(r) for r in val[:23 if max_batches is None else min(23, max_batches * 2)].tolist()]
    for world in (1, 2, 3, 4, 5):
        per_rank = [list(iter_val_batches(val, r, world, 2, max_batches)) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
        seen = [row for batches in per_rank for row in _counted_rows(batches)]
        assert sorted(seen) == sorted(sample)  # every sampled block once, nothing else: the same on any world
        for batches in per_rank:
            for x, y, _ in batches:
                assert x.shape[1] == y.shape[1] == 8 and 1 <= x.shape[0] <= 2 and torch.equal(x[:, 1:], y[:, :-1])
    a = [x for x, _, _ in iter_val_batches(val, 1, 3, 2, None)]
    b = [x for x, _, _ in iter_val_batches(val, 1, 3, 2, None)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    # Fewer blocks than ranks: every rank still runs one forward, and only one rank's counts.
    runs = [list(iter_val_batches(val[:1], r, 4, 2, 4)) for r in range(4)]
    assert [len(b) for b in runs] == [1] * 4 and [b[0][2] for b in runs] == [True, False, False, False]


# --------------------------------------------------------------------------- sampler
def _take(sampler, n):
    return [sampler.next_global_batch() for _ in range(n)]


def test_sampler_deterministic_and_epoch_coverage():
    a, b = GlobalCursorSampler(50, 12, seed=3), GlobalCursorSampler(50, 12, seed=3)
    batches = _take(a, 8)  # 4 batches per epoch (2 leftover samples skipped): two epochs
    assert all(torch.equal(x, y) for x, y in zip(batches, _take(b, 8)))
    for epoch in range(2):
        seen = torch.cat(batches[epoch * 4:(epoch + 1) * 4]).tolist()
        assert len(seen) == len(set(seen)) == 48  # each sample at most once per epoch
        perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))
        assert seen == perm[:48].tolist()
    assert a.state_dict()["epoch"] == 2 and a.state_dict()["samples_consumed"] == 96
    assert not torch.equal(torch.cat(batches[:4]), torch.cat(batches[4:]))
    # Exactly divisible: every sample appears exactly once per epoch.
    c = GlobalCursorSampler(48, 12, seed=0)
    assert sorted(torch.cat(_take(c, 4)).tolist()) == list(range(48))


def test_rank_share_same_multiset_for_any_world_size():
    s = GlobalCursorSampler(100, 24, seed=1)
    batch = s.next_global_batch()
    for world in (1, 2, 3, 4):
        shares = [GlobalCursorSampler.rank_share(batch, r, world, 2) for r in range(world)]
        assert all(len(m) == 24 // world // 2 and all(len(x) == 2 for x in m) for m in shares)
        flat = torch.cat([x for m in shares for x in m])
        assert torch.equal(flat, batch)  # contiguous parts, in order
        assert collections.Counter(flat.tolist()) == collections.Counter(batch.tolist())
    with pytest.raises(ValueError, match=r"global batch size \(24\).*5 x 2 = 10"):
        s.rank_share(batch, 0, 5, 2)


@pytest.mark.parametrize("stop_after", [2, 4, 9])  # mid-epoch, right at the boundary, in the third epoch
def test_sampler_resume_continues_identically(stop_after):
    ref = GlobalCursorSampler(40, 8, seed=11)  # 5 batches per epoch
    expected = _take(ref, 14)
    first = GlobalCursorSampler(40, 8, seed=11)
    got = _take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))
    assert all(type(v) is int for v in state.values())
    resumed = GlobalCursorSampler(40, 8, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    got += _take(resumed, 14 - stop_after)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
    assert resumed.state_dict() == ref.state_dict()


def test_sampler_resume_on_other_world_size_consumes_same_samples():
    full = torch.cat(_take(GlobalCursorSampler(64, 8, seed=5), 6)).tolist()
    s = GlobalCursorSampler(64, 8, seed=5)
    consumed = []
    for _ in range(3):  # world 4
        b = s.next_global_batch()
        consumed += [i for r in range(4) for m in s.rank_share(b, r, 4, 1) for i in m.tolist()]
    s2 = GlobalCursorSampler(64, 8, seed=5)
    s2.load_state_dict(s.state_dict())
    for _ in range(3):  # world 2
        b = s2.next_global_batch()
        consumed += [i for r in range(2) for m in s2.rank_share(b, r, 2, 2) for i in m.tolist()]
    assert consumed == full


def test_sampler_load_mismatch_names_both_values():
    s = GlobalCursorSampler(100, 10, seed=0)
    state = GlobalCursorSampler(120, 10, seed=0).state_dict()
    with pytest.raises(DataError, match=r"120 .*100"):
        s.load_state_dict(state)
    with pytest.raises(DataError, match=r"global batches of 20 .*global_batch_size is now 10"):
        s.load_state_dict(GlobalCursorSampler(100, 20, seed=0).state_dict())
    with pytest.raises(DataError, match="missing"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="fewer than train.global_batch_size"):
        GlobalCursorSampler(5, 8, seed=0)


# ----------------------------------------------------------------------------- data fingerprint
def test_fingerprint_is_the_store_hash_and_the_split():
    from moe_dist.data.loader import data_fingerprint

    val = torch.tensor([3, 9, 20])
    fp = data_fingerprint("a" * 64, 9, 40, val)
    assert fp == data_fingerprint("a" * 64, 9, 40, val.clone())
    assert fp["train_blocks"] == 40 and fp["val_blocks"] == 3 and fp["block_tokens"] == 9
    assert fp["store_sha256"] == "a" * 64
    assert data_fingerprint("b" * 64, 9, 40, val)["sha256"] != fp["sha256"]  # other store contents
    assert data_fingerprint("a" * 64, 9, 40, torch.tensor([3, 9, 21]))["sha256"] != fp["sha256"]  # the split matters
    assert data_fingerprint("a" * 64, 10, 40, val)["sha256"] != fp["sha256"]


def test_fingerprint_changes_with_any_token_of_the_store(tmp_path):
    """The store's hash covers every token (computed while writing), not a sample of the blocks."""
    text = tmp_path / "a.txt"
    text.write_text("x" * 5000)
    cfg = DataConfig(data_files=[str(text)], store_dir=str(tmp_path / "s"))
    fp = build_data(cfg, 31, 0).fingerprint
    text.write_text("x" * 2500 + "y" + "x" * 2499)  # one byte in the middle of one block
    fp2 = build_data(cfg, 31, 0).fingerprint
    assert fp2["store_sha256"] != fp["store_sha256"] and fp2["sha256"] != fp["sha256"]
    assert {k: fp[k] for k in ("train_blocks", "val_blocks", "block_tokens")} == \
        {k: fp2[k] for k in ("train_blocks", "val_blocks", "block_tokens")}


def test_checkpoints_from_before_token_stores_still_match(tmp_path, monkeypatch):
    """Their fingerprint sampled blocks of the in-memory split; the store's blocks give the same one."""
    from moe_dist.data import loader

    monkeypatch.setattr(loader, "LEGACY_SAMPLES", 64)  # fewer samples than blocks: the sampled branch
    cfg = DataConfig(max_corpus_bytes=60_000, store_dir=str(tmp_path))
    blocks = pack_blocks(token_stream(load_documents(cfg), ByteTokenizer()), 31)
    train, val = split_train_val(blocks, cfg.val_fraction, 5)
    old = loader.legacy_fingerprint(train, val)
    assert len(train) > 64 and set(old) == {"train_blocks", "val_blocks", "block_tokens", "sha256"}
    data = build_data(cfg, 31, 5)
    assert data.fingerprint_like(old) == old and data.fingerprint_like(data.fingerprint) == data.fingerprint
    assert build_data(cfg, 31, 6).fingerprint_like(old) != old  # another split


def test_other_data_is_refused_with_what_differs():
    from moe_dist.data.loader import check_same_data

    saved = {"train_blocks": 40, "val_blocks": 5, "block_tokens": 9, "sha256": "a" * 64}
    check_same_data(saved, dict(saved), "ck")
    check_same_data(None, saved, "ck")  # a checkpoint without a fingerprint
    with pytest.raises(DataError, match=r"ck: the training data differs from the checkpoint's \(train_blocks: saved "
                                        r"40, now 41\)\. .*resume with the same data"):
        check_same_data(saved, dict(saved, train_blocks=41), "ck")
    with pytest.raises(DataError, match=r"same block counts but other contents \(sha256 saved aaaaaaaaaaaa…, now "
                                        r"bbbbbbbbbbbb…\)"):
        check_same_data(saved, dict(saved, sha256="b" * 64), "ck")
    with pytest.raises(DataError, match=r"other token store contents \(store sha256 saved cccccccccccc…, now "
                                        r"dddddddddddd…\)"):
        check_same_data(dict(saved, store_sha256="c" * 64), dict(saved, store_sha256="d" * 64, sha256="b" * 64), "ck")
