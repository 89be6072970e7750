"""Shared pieces of the benchmark suite: machine description, interleaved timing, tables, plots.

The rules every section follows (the machine is shared and noisy):

* contenders are measured **side by side in one run**, interleaved (the order rotates every
  repetition so no contender always runs first or last), and reported as the **median** of
  several repetitions;
* results are **ratios** between contenders of the same run, never against a remembered figure;
* every number printed or plotted comes from a measurement of this run.

``Section`` collects what one section reports (tables, notes, plots); ``run.py`` prints it and
writes ``results.md`` plus the PNGs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]

# Model sizes for the multi-process sections, as `moe-train` arguments (preset + --set overrides).
SIZES: dict[str, list[str]] = {
    "tiny": ["--preset", "tiny"],
    "14m": ["--preset", "100m", "--set", "model.d_model=256", "--set", "model.n_layers=4",
            "--set", "model.d_ff=512"],
    "30m": ["--preset", "100m", "--set", "model.d_model=384", "--set", "model.n_layers=4",
            "--set", "model.d_ff=768"],
    "100m": ["--preset", "100m"],
    "300m": ["--preset", "100m", "--set", "model.d_model=768", "--set", "model.n_layers=8",
             "--set", "model.d_ff=1920", "--set", "model.n_heads=12"],
}


# ----------------------------------------------------------------------------- context
@dataclass
class Context:
    """What a section gets from ``run.py``."""

    quick: bool
    out: Path    # results folder: results.md and the PNGs
    work: Path   # scratch folder (checkpoints, runs); removed at the end unless --keep-work

    def scratch(self, *parts: str) -> Path:
        p = self.work.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


def run_alone(run: Callable[[Context], Any], doc: str, name: str) -> Any:
    """``python -m benchmarks.<module> [--quick]``: one section on its own, into a fresh temp folder."""
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    return run(Context(quick=a.quick, out=out, work=out))


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict[str, str]:
    """CPU model, cores, RAM, library versions: the header of results.md."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 ** 2:.1f} GiB"
                break
    except OSError:
        pass
    versions = {}
    for mod in ("torch", "deepspeed", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - a missing library is reported, not fatal
            versions[mod] = f"unavailable ({e.__class__.__name__})"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpu": cpu,
            "cores": f"{os.cpu_count()} logical ({usable} usable by this process)", "ram": ram,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}",
            "load average (1/5/15 min) at start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
            **{f"{k} version": v for k, v in versions.items()}}


# ----------------------------------------------------------------------------- statistics
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    """'min-max' of the repetitions, to show how noisy a median is."""
    return f"{fmt(min(xs))}-{fmt(max(xs))}" if xs else "-"


def interleave(contenders: dict[str, Callable[[], Any]], reps: int, warmup: int = 0,
               on_rep: Optional[Callable[[int], None]] = None) -> dict[str, list[Any]]:
    """Run every contender once per repetition, rotating the order each repetition.

    Each callable performs one measurement and returns its seconds, or a dict of named seconds
    (so it may time several phases and exclude its own set-up and clean-up). ``warmup`` rounds
    run first and are discarded.
    """
    names = list(contenders)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(warmup + reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = contenders[name]()
            if r >= warmup:
                out[name].append(seconds)
        if on_rep is not None and r >= warmup:
            on_rep(r - warmup)
    return out


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ratio(a: float, b: float) -> str:
    """'a/b' as '1.23x'; '-' when undefined, or when either side is <= 0 (a difference of two
    measurements that fell inside the noise: its ratio would mean nothing)."""
    if not (a == a and b == b) or a <= 0 or b <= 0:  # NaN-safe
        return "-"
    return f"{a / b:.2f}x"


def fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or x != x:
        return "-"
    if abs(x) < 5e-4:
        return "0.000"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def dir_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path`` (a file's own size if it is one)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# ----------------------------------------------------------------------------- reporting
@dataclass
class Section:
    """What one section reports, in order: tables, notes and plots (Markdown + console)."""

    title: str
    blocks: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw measurements, dumped to results.json

    def note(self, text: str) -> None:
        self.blocks.append(text)
        print(f"  note: {text}", flush=True)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        rows = [[str(c) for c in r] for r in rows]
        md = ([f"**{caption}**", ""] if caption else []) + [
            "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        self.blocks.append("\n".join(md))
        widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
        lines = ([caption] if caption else []) + [
            "  ".join(str(h).ljust(w) for h, w in zip(headers, widths)),
            "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        print("\n".join("  " + line for line in lines), flush=True)

    def plot(self, fig: Any, out_dir: Path, filename: str, alt: str) -> None:
        path = Path(out_dir) / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.images.append(path)
        self.blocks.append(f"![{alt}]({filename})")
        print(f"  plot: {path}", flush=True)

    def markdown(self) -> str:
        return f"## {self.title}\n\n" + "\n\n".join(self.blocks) + "\n"


def new_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure (headless Agg backend) and its axes (a list when ``ncols`` > 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def grouped_bars(ax: Any, groups: Sequence[str], series: dict[str, Sequence[float]], ylabel: str,
                 title: str) -> None:
    """One cluster of bars per group, one bar per series."""
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


# ----------------------------------------------------------------------------- processes
def run_distributed(args: Sequence[str], world: int, timeout: float, env: Optional[dict[str, str]] = None) -> list:
    """``python *args`` as ``world`` gloo ranks (tests.distributed.harness); raises with every rank's tail."""
    from tests.distributed.harness import check_ranks, run_ranks

    return check_ranks(run_ranks(list(args), world, timeout, env=env), tail_lines=60)


def measure_process(cmd: Sequence[str], timeout: float) -> dict[str, Any]:
    """Wall time and peak RSS of one command, through ``benchmarks.peak_rss`` (a fresh parent per
    command, so ``RUSAGE_CHILDREN`` holds this command's peak alone)."""
    probe = [sys.executable, "-m", "benchmarks.peak_rss", "--", *cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(probe, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    result = json.loads(lines[-1])
    if result["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result['returncode']}:\n{p.stderr[-3000:]}")
    return result


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
