"""Section 7: training data at scale, the token store against the old in-memory path.

* **Preparation throughput** (BPE tokenizer trained offline with ``tests/bpe.py``, on a JSONL of the
  built-in corpus): the tokenizer's own ``encode_batch`` in one process against ``moe-prepare-data``
  with ``num_proc`` 1 and 2 (tokens / the preparation's own seconds, from its header: reading the
  file, ``datasets.map``, writing and hashing). ``TOKENIZERS_PARALLELISM=false`` everywhere, so
  "one process" is one core.
* **Start-up and peak RSS per rank against corpus size**: JSONL corpora of the built-in corpus's
  documents repeated up to 10M / 100M / 500M bytes (byte tokenizer: one token per byte plus one
  EOS per document), made the way the tests make theirs. For each size, two processes side by
  side (two ranks of one machine) run ``benchmarks.data_worker``: ``old`` (what ``build_data`` did
  before the store) and ``store``; then ``moe_dist/train.py`` itself, 2 gloo ranks, 2 steps, on
  the store, each rank under ``benchmarks.peak_rss``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, Context, Section, fmt, median, new_figure, ratio, run_distributed, spread

TITLE = "7. Training data at scale: token store vs in-memory data"
# The old path holds ~20-26 bytes per token on every rank: 2 ranks at 500M tokens need ~20-26 GB,
# more than this shared machine has. Sizes above this run the store only (the table says so).
OLD_PATH_MAX_BYTES = 200_000_000
ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]), **ENV)


def make_corpus(path: Path, target_bytes: int) -> Path:
    """A JSONL file of the built-in corpus's documents, cycled until ``target_bytes`` of text."""
    if path.exists():
        return path
    from moe_dist.data.corpus import stdlib_documents

    docs = stdlib_documents(200_000_000)
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    sizes = [len(d.encode("utf-8")) for d in docs]
    written, i = 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while written < target_bytes:
            f.write(lines[i % len(lines)])
            written += sizes[i % len(lines)]
            i += 1
    tmp.rename(path)
    return path


def _children_cpu() -> float:
    """CPU seconds (user + sys) of every child this process has waited for, theirs included."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def prepare(corpus: Path, store_dir: Path, tokenizer: str, num_proc: int) -> dict[str, Any]:
    """Run moe-prepare-data in a fresh process; its header (with the preparation's seconds), wall
    time and CPU time (its pool workers included: they are waited for)."""
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "moe_dist.data.prepare", "--data-files", str(corpus), "--tokenizer",
                        tokenizer, "--store-dir", str(store_dir), "--num-proc", str(num_proc)],
                       capture_output=True, text=True, cwd=str(REPO_ROOT), env=_env(), timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"moe-prepare-data failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    header = json.loads((Path(out["store"]) / "store.json").read_text())
    return {"store": out["store"], "tokens": header["tokens"], "seconds": header["prepared"]["seconds"], "wall": wall,
            "cpu_s": _children_cpu() - cpu0}


def tokenizer_alone(corpus: Path, tokenizer: str) -> dict[str, float]:
    code = ("import json, sys, time\n"
            "from moe_dist.data import load_tokenizer\n"
            "docs = [json.loads(l)['text'] for l in open(sys.argv[1])]\n"
            "tok = load_tokenizer(sys.argv[2])\n"
            "t = time.perf_counter(); n = sum(len(x) for x in tok.encode_batch(docs)); s = time.perf_counter() - t\n"
            "print(json.dumps({'tokens': n + len(docs), 'seconds': s}))")
    cpu0 = _children_cpu()
    p = subprocess.run([sys.executable, "-c", code, str(corpus), tokenizer], capture_output=True, text=True,
                       cwd=str(REPO_ROOT), env=_env(), timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "cpu_s": _children_cpu() - cpu0}


def two_workers(mode: str, corpus: Path, store_dir: Path) -> list[dict[str, Any]]:
    """Two data workers at once (ranks 0 and 1 of one machine); each one's JSON line."""
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.data_worker", "--mode", mode, "--data-files",
                               str(corpus), "--store-dir", str(store_dir), "--rank", str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT),
                              env=_env()) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"data_worker --mode {mode} failed:\n{err[-3000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def train_on_store(ctx: Context, corpus: Path, store_dir: Path, name: str, steps: int = 2) -> list[dict[str, Any]]:
    """moe_dist/train.py on 2 gloo ranks, ``steps`` steps, each rank under benchmarks.peak_rss."""
    out = ctx.scratch("data", f"train-{name}")
    args = ["-m", "benchmarks.peak_rss", "--", sys.executable, str(REPO_ROOT / "moe_dist" / "train.py"),
            "--preset", "tiny", "--data-files", str(corpus), "--store-dir", str(store_dir), "--max-steps", str(steps),
            "--save-every", "0", "--set", "train.eval_every=0", "--output-dir", str(out)]
    ranks = run_distributed(args, 2, timeout=1800, env={"TORCHDYNAMO_DISABLE": "1", **ENV})
    # rank 0's own peak (RUSAGE_SELF, in metrics.jsonl): peak_rss's figure also counts the rank's
    # children, e.g. a compiler when DeepSpeed JIT-rebuilds an op on that rank
    rows_m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    own = max(r["rss_peak_mb"] for r in rows_m)
    steps_s = sum(r["step_time_s"] for r in rows_m)
    rows = []
    for r in ranks:
        (ctx.out / f"train-{name}-rank{r.rank}.log").write_text(r.output)  # kept: what each rank printed
        probe = json.loads([ln for ln in r.output.splitlines() if ln.startswith('{"returncode"')][-1])
        m = re.search(r"data: .* \((\d+\.\d+)s\)", r.output)
        rows.append({"rank": r.rank, "peak_rss_mb": probe["peak_rss_mb"], "wall_s": probe["seconds"],
                     "wall_minus_steps_s": probe["seconds"] - steps_s,
                     "data_s": float(m.group(1)) if m else None, "own_peak_rss_mb": own if r.rank == 0 else None})
    return rows


def run(ctx: Context) -> Section:
    """The whole section: preparation throughput, then start-up and RSS against corpus size."""
    sec = Section(TITLE)
    preparation_throughput(ctx, sec)
    store_scaling(ctx, sec)
    return sec


def run_startup_only(ctx: Context) -> Section:
    """Start-up on a small and a large store, interleaved (section ``data_startup``)."""
    sec = Section(TITLE + " (start-up on a prepared store only)")
    store_startup(ctx, sec)
    return sec


def run_prep_only(ctx: Context) -> Section:
    """Preparation throughput alone (section ``data_prep``): minutes instead of the section's hour."""
    sec = Section(TITLE + " (preparation throughput only)")
    preparation_throughput(ctx, sec)
    return sec


def preparation_throughput(ctx: Context, sec: Section) -> None:
    work = ctx.scratch("data")
    from tests.bpe import make_bpe_tokenizer

    bpe = str(make_bpe_tokenizer(work / "bpe"))
    prep_corpus = make_corpus(work / "prep.jsonl", 20_000_000)
    reps = 2 if ctx.quick else 3
    names = {"alone": "tokenizer alone (1 process)", 1: "num_proc=1", 2: "num_proc=2"}
    prep: dict[str, list[float]] = {n: [] for n in names.values()}
    cpu: dict[str, list[float]] = {n: [] for n in names.values()}
    load_before = os.getloadavg()
    for r in range(reps):
        order = ["alone", 1, 2]
        for what in order[r % 3:] + order[:r % 3]:
            if what == "alone":
                res = tokenizer_alone(prep_corpus, bpe)
            else:
                res = prepare(prep_corpus, work / f"prep-stores-{what}-{r}", bpe, int(what))
                shutil.rmtree(work / f"prep-stores-{what}-{r}", ignore_errors=True)
            prep[names[what]].append(res["tokens"] / res["seconds"])
            cpu[names[what]].append(res["tokens"] / res["cpu_s"])
            print(f"  prep {what} rep {r}: {res}", flush=True)
    base = median(prep["num_proc=1"])
    sec.table(["contender", "tokens/s (median)", "range", "vs num_proc=1", "tokens per CPU-second (median)"],
              [[k, fmt(median(v)), spread(v), ratio(median(v), base), fmt(median(cpu[k]))] for k, v in prep.items()],
              caption=f"BPE (512 ids) preparation of a {prep_corpus.stat().st_size / 1e6:.0f} MB JSONL of the built-in "
                      f"corpus, {reps} interleaved repetitions; tokens/s = tokens / the preparation's own seconds "
                      "(its header; the tokenizer alone: encode_batch only); CPU seconds of the whole process "
                      "and its workers. Load average (1/5/15 min) "
                      f"{' / '.join(f'{x:.1f}' for x in load_before)} before, "
                      f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} after, on {os.cpu_count()} cores; "
                      f"process niceness {os.nice(0)} (a negative value: run ahead of other work on a shared machine)")
    sec.data["prepare_tokens_per_s"] = prep
    sec.data["prepare_tokens_per_cpu_s"] = cpu
    sec.data["nice"] = os.nice(0)


def store_startup(ctx: Context, sec: Section) -> None:
    """train.py on 2 ranks, 1 step, on a prepared 10M- and 500M-token store, repetitions interleaved:
    what the corpus size adds to start-up (the rest, imports and the engine, is the same for both)."""
    work = ctx.scratch("data")
    sizes = {"10M": 10_000_000, "500M": 100_000_000 if ctx.quick else 500_000_000}
    stores = {}
    for label, size in sizes.items():
        corpus = make_corpus(work / f"startup-{label}.jsonl", size)
        stores[label] = (corpus, work / f"startup-stores-{label}", prepare(corpus, work / f"startup-stores-{label}",
                                                                          "byte", 2)["tokens"])
    reps = 2 if ctx.quick else 3
    runs: dict[str, list[list[dict[str, Any]]]] = {k: [] for k in sizes}
    for r in range(reps):
        for label in (list(sizes) if r % 2 == 0 else list(sizes)[::-1]):
            corpus, store_dir, _ = stores[label]
            runs[label].append(train_on_store(ctx, corpus, store_dir, f"startup-{label}-{r}", steps=1))
            print(f"  startup {label} rep {r}: {runs[label][-1]}", flush=True)
    rows = []
    for label, rr in runs.items():
        walls = [max(x["wall_s"] for x in run) for run in rr]
        data_s = [run[0]["data_s"] for run in rr]
        rss = [max(x["peak_rss_mb"] for x in run) for run in rr]
        start = [max(x["wall_minus_steps_s"] for x in run) for run in rr]
        rows.append([label, f"{stores[label][2]:,}", fmt(median(walls)), spread(walls), fmt(median(start)),
                     spread(start), fmt(median(data_s)), spread(data_s), fmt(median(rss))])
    small, large = list(sizes)
    diff = median([max(x["wall_s"] for x in run) for run in runs[large]]) - \
        median([max(x["wall_s"] for x in run) for run in runs[small]])
    sec.table(["store", "tokens", "train.py wall s, 1 step (median, slower rank)", "range",
               "wall minus the step's own time s (start-up and exit)", "range",
               "data set-up s (rank 0)", "range", "peak RSS MB (larger rank, median)"], rows,
              caption=f"moe_dist/train.py --preset tiny, 2 gloo ranks, 1 step, no save, on prepared byte-tokenizer "
                      f"stores; {reps} repetitions, order alternating; the wall time is the whole process "
                      f"(interpreter, imports, process group, DeepSpeed engine, data, the step, the loss plot). "
                      f"Median wall difference {large} - {small}: {diff:+.2f} s")
    sec.data["startup"] = {"runs": runs, "wall_diff_s": diff}
    for _, store_dir, _ in stores.values():
        shutil.rmtree(store_dir, ignore_errors=True)
    for corpus, _, _ in stores.values():
        os.remove(corpus)


def store_scaling(ctx: Context, sec: Section) -> None:
    work = ctx.scratch("data")
    sizes = [10_000_000, 100_000_000] if ctx.quick else [10_000_000, 100_000_000, 500_000_000]
    rows, results = [], {}
    for size in sizes:
        label = f"{size // 1_000_000}M"
        corpus = make_corpus(work / f"corpus-{label}.jsonl", size)
        stores = work / f"stores-{label}"
        p = prepare(corpus, stores, "byte", 2)
        res: dict[str, Any] = {"tokens": p["tokens"], "prepare_s": p["seconds"]}
        res["store"] = two_workers("store", corpus, stores)
        res["old"] = two_workers("old", corpus, stores) if size <= OLD_PATH_MAX_BYTES else None
        res["train"] = train_on_store(ctx, corpus, stores, label)
        results[label] = res
        old = res["old"]
        rows.append([label, f"{p['tokens']:,}", fmt(p["seconds"]),
                     " / ".join(fmt(w["seconds_to_first_batch"]) for w in old) if old else "not run",
                     " / ".join(fmt(w["peak_rss_mb"]) for w in old) if old else "not run",
                     " / ".join(fmt(w["seconds_to_first_batch"]) for w in res["store"]),
                     " / ".join(fmt(w["peak_rss_mb"]) for w in res["store"]),
                     " / ".join(fmt(t["data_s"]) for t in res["train"][:1]),
                     " / ".join(fmt(t["wall_s"]) for t in res["train"]),
                     " / ".join(fmt(t["peak_rss_mb"]) for t in res["train"]),
                     fmt(res["train"][0]["own_peak_rss_mb"])])
        print(f"  {label}: {res}", flush=True)
        os.remove(corpus)  # the big files go as soon as they are measured
        shutil.rmtree(stores, ignore_errors=True)
    sec.table(["corpus", "tokens", "prepare s (2 procs)", "old: s to 1st batch (rank 0 / 1)",
               "old: peak RSS MB", "store: s to 1st batch", "store: peak RSS MB", "train.py: data set-up s (rank 0)",
               "train.py: wall s, 2 steps", "train.py: peak RSS MB with children (rank 0 / 1)",
               "train.py: rank 0's own peak RSS MB"], rows,
              caption="per rank, two ranks at once on this machine; old = the in-memory build_data before the store "
                      "(benchmarks.data_worker --mode old), store = build_data on the prepared store; train.py = "
                      "moe_dist/train.py --preset tiny on 2 gloo ranks, 2 steps, on the store")
    if any(r["old"] is None for r in results.values()):
        sec.note(f"the old path is not run above {OLD_PATH_MAX_BYTES / 1e6:.0f}M tokens: at the ~20-26 bytes per token "
                 "it holds on every rank, 2 ranks at 500M tokens would need more memory than this shared machine has.")
    first, last = results[f"{sizes[0] // 1_000_000}M"], results[f"{sizes[-1] // 1_000_000}M"]
    growth = [b["peak_rss_mb"] - a["peak_rss_mb"] for a, b in zip(first["train"], last["train"])]
    own = last["train"][0]["own_peak_rss_mb"] - first["train"][0]["own_peak_rss_mb"]
    sec.note(f"train.py peak RSS per rank at {sizes[-1] // 1_000_000}M tokens minus at {sizes[0] // 1_000_000}M: "
             + " / ".join(f"{g:+.0f} MB" for g in growth) + f" (rank 0's own: {own:+.0f} MB); data set-up on rank 0: "
             f"{fmt(first['train'][0]['data_s'])} s vs {fmt(last['train'][0]['data_s'])} s")
    sec.data["by_size"] = results

    fig, ax = new_figure()
    xs = [results[k]["tokens"] for k in results]
    ax.plot(xs, [max(w["peak_rss_mb"] for w in r["store"]) for r in results.values()], "o-", label="store (data only)")
    ax.plot(xs, [r["train"][1]["peak_rss_mb"] for r in results.values()], "s-", label="store (train.py, rank 1)")
    ax.plot(xs, [r["train"][0]["own_peak_rss_mb"] for r in results.values()], "d-",
            label="store (train.py, rank 0's own)")
    olds = [(r["tokens"], max(w["peak_rss_mb"] for w in r["old"])) for r in results.values() if r["old"]]
    ax.plot([x for x, _ in olds], [y for _, y in olds], "^-", label="old in-memory (data only)")
    ax.set_xscale("log")
    ax.set_xlabel("corpus tokens")
    ax.set_ylabel("peak RSS per rank (MB)")
    ax.set_title("Peak RSS per rank vs corpus size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    sec.plot(fig, ctx.out, "data_rss_vs_corpus.png", "peak RSS per rank vs corpus size")
