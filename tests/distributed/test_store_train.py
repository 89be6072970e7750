"""End to end on a token store with a real BPE tokenizer (trained offline, ``tests/bpe.py``):
prepare on first use by 2 ranks, train, ``moe-prepare-data`` finds the same store, resume on it
(bitwise on the same topology, the same tokens on another world size), then generate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ..bpe import make_bpe_tokenizer
from .harness import REPO_ROOT
from .trainrun import by_step, metrics, train

pytestmark = pytest.mark.distributed

STEPS, HALF = 6, 3


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bpe")
    tok = make_bpe_tokenizer(base / "tok")
    stores = base / "stores"
    common = ["--tokenizer", str(tok), "--set", "model.vocab_size=512"]
    ref = base / "ref"
    log = train(ref, 2, *common, "--store-dir", str(stores), "--max-steps", str(STEPS), "--save-every", str(HALF))
    return tok, stores, ref, common, log[0].output


def test_first_use_prepares_one_store_that_moe_prepare_data_finds(bpe_run):
    tok, stores, ref, _, log = bpe_run
    published = [p for p in stores.iterdir() if not p.name.startswith(".")]
    assert len(published) == 1 and not list(stores.glob(".*.tmp-*"))  # two ranks, one preparation
    assert f"in {published[0]} -> " in log
    proc = subprocess.run([sys.executable, "-m", "moe_dist.data.prepare", "--tokenizer", str(tok),
                           "--max-corpus-bytes", "300000", "--store-dir", str(stores)],
                          capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["store"] == str(published[0]) and "preparing" not in proc.stderr
    assert out["dtype"] == "uint16" and 300_000 / 4 < out["tokens"] < 300_000 / 1.2  # BPE merges, not bytes
    header = json.loads((published[0] / "store.json").read_text())
    state = json.loads((ref / "checkpoints" / f"checkpoint_step_{STEPS}" / "train_state.json").read_text())
    assert state["data"]["store_sha256"] == header["sha256"]  # the checkpoint's fingerprint is the store's hash
    assert state["tokenizer"]["type"] == "hf" and state["tokenizer"]["vocab_size"] == 512


def _resume_copy(ref, dst, world, *args):
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / f"checkpoint_step_{HALF}", dst / "checkpoints" / f"checkpoint_step_{HALF}")
    rows = [r for r in metrics(ref) if r["step"] <= HALF]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(dst, world, "--max-steps", str(STEPS), "--resume", "auto", *args)
    return by_step(metrics(dst))


# Bitwise on the same topology here; other world sizes resume on a store in test_resume.py (the built-in
# corpus's store: every run reads one), which keeps this module to three training runs.
@pytest.mark.parametrize("world", [2], ids=["same_world_bitwise"])
def test_resume_on_the_store(bpe_run, tmp_path, world):
    tok, stores, ref, common, _ = bpe_run
    store = next(p for p in stores.iterdir() if not p.name.startswith("."))
    rows = _resume_copy(ref, tmp_path / "r", world, *common, "--data-store", str(store))
    a = by_step(metrics(ref))
    for s in range(HALF + 1, STEPS + 1):
        assert rows[s]["tokens"] == a[s]["tokens"]
        if world == 2:
            assert rows[s]["loss"] == a[s]["loss"], f"step {s}: {rows[s]['loss']!r} != {a[s]['loss']!r}"
        else:
            assert abs(rows[s]["loss"] - a[s]["loss"]) < 1e-4, f"step {s}: {rows[s]['loss']} vs {a[s]['loss']}"


def test_generate_with_the_bpe_tokenizer(bpe_run):
    tok, _, ref, _, _ = bpe_run
    proc = subprocess.run([sys.executable, "-m", "moe_dist.export.inference", str(ref / "checkpoints" / "checkpoint_latest"),
                           "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"],
                          capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("def ") and len(proc.stdout) > len("def \n")
    assert "new tokens" in proc.stderr
