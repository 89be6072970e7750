"""Does storing a parameter in DCP as an N-D ShardedTensor of several boxes per rank cost more
than storing it as a flat 1-D ShardedTensor of one shard per rank?

    python -m benchmarks.bench_nd_layout                       # P=8 params of (1024, 3072) fp32, 5 reps
    python -m benchmarks.bench_nd_layout --params 8 --reps 7 --one-buffer

Each of P parameters of shape S (default (1024, 3072), fp32) is flattened and cut into W contiguous
runs at uneven cut points that fall mid-row (a ZeRO-1/2 partition). Two layouts of the same runs:

* ``1-D``: a ShardedTensor of global size [N], each rank's one shard = its run;
* ``N-D``: a ShardedTensor of global size S, each rank's shards = the boxes of its run
  (``moe_dist.checkpoint.fragment.flat_boxes``) as zero-copy views (what ``dcp_state._sharded`` builds).

Three operations, each with both layouts interleaved (order rotating every repetition, one
warm-up round dropped), medians reported:

* save on ``--save-world`` (2) gloo ranks, ``FileSystemWriter(sync_files=True)``;
* load on ``--load-world`` (3) ranks into a template of the same kind with another split;
* load in one process (``no_dist=True``) into one plain tensor of the whole parameter ([N] or S).

Loads have a third contender, ``N-D, read once``: the N-D checkpoint through moe_dist's own
``CheckpointReader``, which unpickles each saved block once per ``read_data`` (DCP's
``FileSystemReader`` unpickles it again for every piece cut from it, and an N-D rank's boxes cut
several from one saved block). Checkpoint loads in moe_dist (resume, consolidate, inference) use it.

Loads read what the last save of each layout wrote, from the page cache (nothing here drops it).
Phases come from timing wrappers around DCP's own planner and storage classes: ``build`` (the
ShardedTensors), ``plan`` (local + global plan, planner and storage), ``io`` (``write_data`` /
``read_data``), ``meta`` (``finish`` / ``read_metadata``), ``other`` (the rest: collectives, waiting
for the other ranks). Per repetition the slowest rank counts.

``--one-buffer``: every rank's runs are views of one flat buffer (as ZeRO's partition is), so DCP
clones every shard before writing in both layouts; by default each run is its own tensor and only
the N-D boxes (views into a run) are cloned.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .common import fmt, interleave, machine_info, median, ratio, spread

LAYOUTS = ("1-D", "N-D")
READ_ONCE = "N-D, read once"  # the N-D checkpoint through moe_dist's CheckpointReader (each saved block once)
LOADS = {"1-D": ("1-D", "reader"), "N-D": ("N-D", "reader"), READ_ONCE: ("N-D", "once_reader")}
PHASES = ("build", "plan", "io", "meta", "other")


# ----------------------------------------------------------------------------- layout
def cuts(numel: int, row: int, world: int, p: int) -> list[int]:
    """Uneven cut points of param ``p``: [0, c1, ..., numel], every inner one mid-row."""
    out = [0]
    for i in range(1, world):
        c = i * numel // world + ((p + 1) * 7919 * i) % row - row // 2
        if c % row == 0:
            c += 1
        out.append(c)
    return out + [numel]


def param_values(p: int, numel: int) -> "Any":
    import torch

    g = torch.Generator().manual_seed(1000 + p)
    return torch.randn(numel, generator=g)  # [N] fp32


def local_runs(shape: tuple[int, ...], params: int, world: int, rank: int, one_buffer: bool, fill: bool
               ) -> list[tuple[Any, int, list[int]]]:
    """[(run [n], start, cut points)] of this rank, one per param; filled with the param's values or zeros."""
    import torch

    numel, row = math.prod(shape), shape[-1]
    plan = [cuts(numel, row, world, p) for p in range(params)]
    sizes = [c[rank + 1] - c[rank] for c in plan]
    buf = torch.zeros(sum(sizes)) if one_buffer else None
    out, pos = [], 0
    for p, c in enumerate(plan):
        run = buf.narrow(0, pos, sizes[p]) if one_buffer else torch.zeros(sizes[p])
        if fill:
            run.copy_(param_values(p, numel).narrow(0, c[rank], sizes[p]))
        out.append((run, c[rank], c))
        pos += sizes[p]
    return out


def sharded(layout: str, shape: tuple[int, ...], run: Any, start: int, c: list[int], rank: int) -> Any:
    """One param as a ShardedTensor of ``layout``: every rank's shards in the metadata, ours as views."""
    import torch
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    from moe_dist.checkpoint.fragment import box_view, flat_boxes

    metas, shards = [], []
    for r in range(len(c) - 1):
        lo, n = c[r], c[r + 1] - c[r]
        if layout == "1-D":
            pieces = [([lo], [n], None)]
        else:
            pieces = [(list(b.offsets), list(b.sizes), b) for b in flat_boxes(shape, lo, n)]
        for offsets, sizes, box in pieces:
            m = ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=f"rank:{r}/cpu")
            metas.append(m)
            if r == rank:
                shards.append(Shard(run if box is None else box_view(run, box, start), m))
    props = TensorProperties(dtype=torch.float32, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    size = torch.Size([math.prod(shape)] if layout == "1-D" else shape)
    md = ShardedTensorMetadata(shards_metadata=metas, size=size, tensor_properties=props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, md)


# ----------------------------------------------------------------------------- timed DCP classes
@contextlib.contextmanager
def clock(t: dict[str, float], phase: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        t[phase] = t.get(phase, 0.0) + time.perf_counter() - t0


def timed_dcp(t: dict[str, float]) -> dict[str, type]:
    """DCP's default planners and filesystem storage, adding their seconds per phase to ``t``."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
    from torch.futures import Future

    class SavePlanner(DefaultSavePlanner):
        def create_local_plan(self):
            with clock(t, "plan"):
                plan = super().create_local_plan()
            t["items"] = len(plan.items)
            return plan

        def create_global_plan(self, plans):
            with clock(t, "plan"):
                return super().create_global_plan(plans)

    class Writer(FileSystemWriter):
        def prepare_local_plan(self, plan):
            with clock(t, "plan"):
                return super().prepare_local_plan(plan)

        def prepare_global_plan(self, plans):
            with clock(t, "plan"):
                return super().prepare_global_plan(plans)

        def write_data(self, plan, planner):
            with clock(t, "io"):
                fut = super().write_data(plan, planner)
                fut.wait()
            return fut

        def finish(self, metadata, results):
            with clock(t, "meta"):
                return super().finish(metadata, results)

    class LoadPlanner(DefaultLoadPlanner):
        def create_local_plan(self):
            with clock(t, "plan"):
                plan = super().create_local_plan()
            t["items"] = len(plan.items)
            return plan

        def create_global_plan(self, plans):
            with clock(t, "plan"):
                return super().create_global_plan(plans)

    class Reader(FileSystemReader):
        def read_metadata(self):
            with clock(t, "meta"):
                return super().read_metadata()

        def read_data(self, plan, planner):
            # Each read item deserializes its whole saved item from the file, however little it uses.
            t["MB deserialized"] = sum(self.storage_data[ri.storage_index].length for ri in plan.items) / 2 ** 20
            with clock(t, "io"):
                fut = super().read_data(plan, planner)
                fut.wait()
            return fut

    from moe_dist.checkpoint.reader import CheckpointReader

    class OnceReader(CheckpointReader):
        """The project's reader (``moe_dist.checkpoint.reader``): each saved block unpickled once
        per ``read_data``, every piece cut from it (DCP's ``FileSystemReader`` unpickles the whole
        block again for each piece)."""

        def read_metadata(self, *args, **kwargs):
            with clock(t, "meta"):
                return super().read_metadata(*args, **kwargs)

        def read_data(self, plan, planner):
            blocks = {(self.storage_data[ri.storage_index].relative_path, self.storage_data[ri.storage_index].offset):
                      self.storage_data[ri.storage_index].length for ri in plan.items}
            t["MB deserialized"] = sum(blocks.values()) / 2 ** 20
            with clock(t, "io"):
                fut = super().read_data(plan, planner)
                fut.wait()
            return fut

    return {"save_planner": SavePlanner, "writer": Writer, "load_planner": LoadPlanner, "reader": Reader,
            "once_reader": OnceReader}


def finish_times(t: dict[str, float], total: float) -> dict[str, float]:
    t["total"] = total
    t["other"] = total - sum(t.get(p, 0.0) for p in PHASES if p != "other")
    return t


# ----------------------------------------------------------------------------- one rank
def rank_save(a: argparse.Namespace, shape: tuple[int, ...]) -> list[dict]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    runs = local_runs(shape, a.params, world, rank, a.one_buffer, fill=True)
    work = Path(a.work)

    def one(layout: str) -> dict[str, float]:
        path = work / f"save-{layout}"
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        t: dict[str, float] = {}
        cls = timed_dcp(t)
        t0 = time.perf_counter()
        with clock(t, "build"):
            sd = {f"p{p}": sharded(layout, shape, run, s, c, rank) for p, (run, s, c) in enumerate(runs)}
        dcp.save(sd, storage_writer=cls["writer"](str(path), sync_files=True), planner=cls["save_planner"]())
        return finish_times(t, time.perf_counter() - t0)

    return interleave({lay: (lambda lay=lay: one(lay)) for lay in LAYOUTS}, a.reps, warmup=1)


def rank_load(a: argparse.Namespace, shape: tuple[int, ...]) -> list[dict]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    runs = local_runs(shape, a.params, world, rank, a.one_buffer, fill=False)
    work = Path(a.work)

    def one(name: str) -> dict[str, float]:
        layout, reader = LOADS[name]
        for run, _, _ in runs:
            run.zero_()
        dist.barrier()
        t: dict[str, float] = {}
        cls = timed_dcp(t)
        t0 = time.perf_counter()
        with clock(t, "build"):
            sd = {f"p{p}": sharded(layout, shape, run, s, c, rank) for p, (run, s, c) in enumerate(runs)}
        dcp.load(sd, storage_reader=cls[reader](str(work / f"save-{layout}")), planner=cls["load_planner"]())
        return finish_times(t, time.perf_counter() - t0)

    out = interleave({name: (lambda name=name: one(name)) for name in LOADS}, a.reps, warmup=1)
    numel = math.prod(shape)
    for p, (run, s, _) in enumerate(runs):  # the last load (either layout) holds the saved values
        if not torch.equal(run, param_values(p, numel).narrow(0, s, run.numel())):
            raise AssertionError(f"rank {rank}: p{p} loaded wrong values")
    return out


def worker(a: argparse.Namespace) -> int:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # ShardedTensor is deprecated
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    shape = tuple(a.shape)
    out = (rank_save if a.worker == "save" else rank_load)(a, shape)
    Path(a.work, f"{a.worker}-rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def single_load(a: argparse.Namespace, shape: tuple[int, ...]) -> dict[str, list[dict]]:
    """Load every param whole in this process (no process group) into a plain tensor."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore", category=FutureWarning)
    numel = math.prod(shape)
    full = {lay: [torch.zeros([numel] if lay == "1-D" else shape) for _ in range(a.params)] for lay in LAYOUTS}

    def one(name: str) -> dict[str, float]:
        layout, reader = LOADS[name]
        for x in full[layout]:
            x.zero_()
        t: dict[str, float] = {}
        cls = timed_dcp(t)
        t0 = time.perf_counter()
        with clock(t, "build"):
            sd = {f"p{p}": x for p, x in enumerate(full[layout])}
        dcp.load(sd, storage_reader=cls[reader](str(Path(a.work) / f"save-{layout}")),
                 planner=cls["load_planner"](), no_dist=True)
        return finish_times(t, time.perf_counter() - t0)

    out = interleave({name: (lambda name=name: one(name)) for name in LOADS}, a.reps, warmup=1)
    one(READ_ONCE)  # untimed: so the N-D tensors checked below come from the read-once reader
    for lay in LAYOUTS:  # the last load of each layout holds the saved values
        for p, x in enumerate(full[lay]):
            if not torch.equal(x.reshape(-1), param_values(p, numel)):
                raise AssertionError(f"single-process load {lay}: p{p} wrong values")
    return out


# ----------------------------------------------------------------------------- driver
def busiest_rank(per_rank: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Per contender and repetition, the figures of the rank that worked longest (total - other):
    the others spend the difference waiting for it in a collective."""
    return {name: [max(ds, key=lambda d: d["total"] - d["other"]) for ds in zip(*(r[name] for r in per_rank))]
            for name in per_rank[0]}


def report(results: dict[str, dict[str, list[dict]]]) -> str:
    lines = ["| operation | 1-D median (range) s | N-D median (range) s | N-D / 1-D | N-D read once: median s, "
             "/ 1-D |", "|---|---|---|---|---|"]
    for op, res in results.items():
        tot = {name: [d["total"] for d in res[name]] for name in res}
        med = {name: median(v) for name, v in tot.items()}
        once = (f"{fmt(med[READ_ONCE])} ({spread(tot[READ_ONCE])}), {ratio(med[READ_ONCE], med['1-D'])}"
                if READ_ONCE in res else "-")
        lines.append(f"| {op} | {fmt(med['1-D'])} ({spread(tot['1-D'])}) | {fmt(med['N-D'])} ({spread(tot['N-D'])}) | "
                     f"{ratio(med['N-D'], med['1-D'])} | {once} |")
    cols = list(PHASES) + ["items", "MB deserialized"]
    lines += ["", "Phases, median seconds of the busiest rank per repetition (the one with the most time outside "
              "`other`); `items`: its write/read items; `MB deserialized`: saved bytes it unpickles:", "",
              "| operation | contender | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for op, res in results.items():
        for name in res:
            cells = [fmt(median([d.get(c, 0.0) for d in res[name]])) for c in cols]
            lines.append(f"| {op} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_nd_layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=8, help="number of parameters P")
    p.add_argument("--shape", type=int, nargs="+", default=[1024, 3072], help="shape of every parameter")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per layout (after one warm-up)")
    p.add_argument("--save-world", type=int, default=2, help="gloo ranks that save")
    p.add_argument("--load-world", type=int, default=3, help="gloo ranks that load (another split)")
    p.add_argument("--one-buffer", action="store_true", help="each rank's runs are views of one flat buffer")
    p.add_argument("--work", default=None, help="scratch folder for the checkpoints (default: a temp folder)")
    p.add_argument("--worker", choices=["save", "load"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)

    from .common import run_distributed

    info = machine_info()
    print(f"{info['cpu']} | {info['cores']} | load {info['load average (1/5/15 min) at start']} | "
          f"torch {info['torch version']}", flush=True)
    keep = a.work is not None
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="nd_layout_"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["-m", "benchmarks.bench_nd_layout", "--params", str(a.params), "--shape", *map(str, a.shape),
              "--reps", str(a.reps), "--work", str(work)] + (["--one-buffer"] if a.one_buffer else [])
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        for op, world in (("save", a.save_world), ("load", a.load_world)):
            run_distributed([*common, "--worker", op], world, timeout=600, env={"OMP_NUM_THREADS": "1"})
            per_rank = [json.loads((work / f"{op}-rank{r}.json").read_text()) for r in range(world)]
            results[f"{op}, {world} ranks"] = busiest_rank(per_rank)
        a.work = str(work)
        results["load, 1 process"] = single_load(a, tuple(a.shape))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"P={a.params} params of {tuple(a.shape)} fp32, runs {'in one buffer' if a.one_buffer else 'separate'}, "
          f"{a.reps} reps; load average now {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
