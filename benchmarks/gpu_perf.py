"""GPU throughput: moe_dist's training step against a bare PyTorch loop of the same model, on one GPU.

    python -m benchmarks.gpu_perf                          # on a CUDA machine: ~8 min (--budget-s 480)
    python -m benchmarks.gpu_perf --out DIR --peak-tflops 989 --budget-s 300
    python -m benchmarks.gpu_perf --cpu-smoke --out /tmp/p # the same driver on CPU, tiny model (CI)

Every case is one ``python -m benchmarks.train_step_worker`` subprocess (one process, one GPU, world 1,
no launcher): it builds moe_dist's step from ``moe-train`` flags and a bare loop of the same model, and
steps them in turn (``moe``, ``bare``, and ``bare_loop``: the bare loop on the experts' loop kernel).
The model is the ``4090`` preset in bf16 at seq 1024 with AdamW (the bare loop's optimizer, so the ratio
is the engine's overhead), global batch = micro-batch (no accumulation: both step the same tokens).
The micro-batch is the largest of 8, 4, 2, 1 that fits (a worker that fails with CUDA out of memory
does not fit; it holds both models and both optimizers).

Cases, by priority (``--budget-s`` skips the tail, and the report says which): ZeRO-1 eager, FSDP2
eager, ZeRO-1 / FSDP2 with ``--compile``, moe_dist on the loop kernel, then both engines with
activation checkpointing. Writes ``DIR/gpu_perf.md`` (device, versions, the table, what was skipped)
and ``DIR/gpu_perf.json`` (the workers' raw figures). Exit code: 0 unless a worker failed for a reason
other than memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
from importlib import metadata
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .gpu_check import CONFIGS, PEAK_BF16_TFLOPS, REPO_ROOT, _pct, _tail, launch_env, run_logged

BUDGET_S = 480.0
CASE_TIMEOUT_S = 300.0
COMPILE_COST = 3.0  # a compiled case's first guess: this many times the longest eager one (until one ran)
SKIP_LINE = ("gpu_perf: skipped: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, "
             "or --cpu-smoke to exercise the code path")


@dataclass(frozen=True)
class Setup:
    """What the cases run on: the GPU's model and sizes, or the CPU smoke's."""
    preset: str
    precision: str
    seq_len: int
    micro_batches: tuple[int, ...]
    rounds: int
    warmup: int
    zero_json: str  # launch_configs/<zero_json>_zero1.json if there is one, else _zero2.json + --zero-stage 1


GPU = Setup("4090", "bf16", 1024, (8, 4, 2, 1), rounds=10, warmup=3, zero_json="gpu")
SMOKE = Setup("tiny", "fp32", 64, (2, 1), rounds=2, warmup=1, zero_json="cpu")


@dataclass(frozen=True)
class Case:
    name: str
    engine: str             # "deepspeed ZeRO-1" or "fsdp2": the report's engine column
    compile: bool = False
    loop_kernel: bool = False  # moe_dist itself on the loop kernel (else parallel.expert_kernel=auto)
    ac: bool = False        # activation checkpointing
    contenders: str = "moe,bare,bare_loop"


ZERO1, FSDP2 = "deepspeed ZeRO-1", "fsdp2"
CASES = [  # priority order: the budget cuts from the end
    Case("ZeRO-1 eager", ZERO1), Case("FSDP2 eager", FSDP2),
    Case("ZeRO-1 compile", ZERO1, compile=True, contenders="moe,bare"),
    Case("FSDP2 compile", FSDP2, compile=True, contenders="moe,bare"),
    Case("ZeRO-1 loop kernel", ZERO1, loop_kernel=True, contenders="moe,bare"),
    Case("ZeRO-1 eager + AC", ZERO1, ac=True), Case("FSDP2 eager + AC", FSDP2, ac=True),
]


@dataclass
class Outcome:
    case: Case
    status: str                       # "ok", "oom" (no micro-batch fits), "failed", "skipped"
    detail: str = ""
    micro_batch: Optional[int] = None
    result: dict = field(default_factory=dict)  # the worker's JSON
    attempts: list = field(default_factory=list)  # [{"micro_batch", "rc", "oom", "seconds"}]
    seconds: float = 0.0


def flops_per_token(active_params: int, n_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token: 6 x active parameters (forward + backward matmuls) + 6 x layers x d_model x
    seq_len (causal attention: QK^T and AV are 2 x 2 x seq x d per token forward, halved by the mask, x 3
    with backward). Activation checkpointing's recompute is not counted (model FLOPs, not hardware FLOPs)."""
    return 6 * active_params + 6 * n_layers * d_model * seq_len


def mfu(tokens_per_s: float, per_token_flops: float, peak_tflops: Optional[float]) -> Optional[float]:
    return None if peak_tflops is None else tokens_per_s * per_token_flops / (peak_tflops * 1e12)


def peak_for(device_name: str) -> Optional[float]:
    """Dense bf16 TFLOP/s by device name (gpu_check's table), None where the name is not in it."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def zero1_flags(setup: Setup) -> list[str]:
    own = CONFIGS / f"{setup.zero_json}_zero1.json"
    if own.exists():
        return ["--deepspeed-config", str(own)]
    return ["--deepspeed-config", str(CONFIGS / f"{setup.zero_json}_zero2.json"), "--zero-stage", "1"]


def train_flags(setup: Setup, case: Case, micro: int, out: Path) -> list[str]:
    s = ["--preset", setup.preset, "--set", f"parallel.precision={setup.precision}",
         "--set", f"train.seq_len={setup.seq_len}", "--set", f"model.max_seq_len={setup.seq_len}",
         "--set", "train.optimizer=adamw", "--set", f"train.micro_batch_size={micro}",
         "--set", f"train.global_batch_size={micro}", "--set", "train.eval_every=0",
         "--set", f"parallel.activation_checkpointing={str(case.ac).lower()}",  # the 4090 preset turns it on
         "--output-dir", str(out)]
    s += zero1_flags(setup) if case.engine == ZERO1 else ["--engine", "fsdp2"]
    s += ["--compile"] if case.compile else []
    s += ["--set", "parallel.expert_kernel=loop"] if case.loop_kernel else []
    return s


class Driver:
    """Runs the cases in priority order within the budget, each at the largest micro-batch that fits."""

    def __init__(self, work: Path, setup: Setup, smoke: bool, budget_s: float, case_timeout_s: float,
                 smoke_compile: bool) -> None:
        self.work, self.setup, self.smoke = work, setup, smoke
        self.budget_s, self.case_timeout_s, self.smoke_compile = budget_s, case_timeout_s, smoke_compile
        self.started = time.perf_counter()
        self.fits: dict[tuple[str, bool], int] = {}  # (engine, ac) -> largest micro-batch that fitted
        self.outcomes: list[Outcome] = []

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def estimate_s(self, case: Case) -> float:
        """A guess at a case's seconds from those that ran: 0 before any ran (the first always runs)."""
        same = [o.seconds for o in self.outcomes if o.status == "ok" and o.case.compile == case.compile]
        if same:
            return max(same)
        eager = [o.seconds for o in self.outcomes if o.status == "ok" and not o.case.compile]
        return (COMPILE_COST if case.compile else 1.0) * max(eager, default=0.0)

    def run_all(self, cases: list[Case]) -> None:
        for case in cases:
            if case.compile and self.smoke and not self.smoke_compile:
                self._note(Outcome(case, "skipped", "compile is off in the CPU smoke (pass --smoke-compile)"))
                continue
            guess = self.estimate_s(case)
            if guess > self.left_s():
                self._note(Outcome(case, "skipped", f"budget: {max(self.left_s(), 0):.0f} s of --budget-s "
                                                    f"{self.budget_s:.0f} left, this case takes ~{guess:.0f} s"))
                continue
            self._note(self.run_case(case))

    def run_case(self, case: Case) -> Outcome:
        t0 = time.perf_counter()
        out = Outcome(case, "oom")
        start = self.fits.get((case.engine, case.ac), max(self.setup.micro_batches))
        for micro in [m for m in self.setup.micro_batches if m <= start]:
            timeout = min(self.case_timeout_s, self.left_s())
            if timeout < 1:
                out.status, out.detail = "skipped", f"budget: --budget-s {self.budget_s:.0f} spent while fitting"
                break
            res, seconds = self.worker(case, micro, timeout)
            oom = res.returncode != 0 and "out of memory" in (res.stdout + res.stderr).lower()
            out.attempts.append({"micro_batch": micro, "rc": res.returncode, "oom": oom, "seconds": seconds})
            if res.returncode == 0:
                out.status, out.micro_batch = "ok", micro
                out.result = json.loads((self.work / f"{_slug(case.name)}-mb{micro}.json").read_text())
                self.fits[(case.engine, case.ac)] = micro
                break
            if res.returncode == 124 and timeout < self.case_timeout_s:
                out.status, out.detail = "skipped", f"budget: --budget-s {self.budget_s:.0f} ran out during it"
                break
            if not oom:
                out.status, out.detail = "failed", f"micro-batch {micro}: {_tail(res)}"
                break
        else:
            out.detail = f"CUDA out of memory at every micro-batch of {self.setup.micro_batches}"
        out.seconds = time.perf_counter() - t0
        return out

    def worker(self, case: Case, micro: int, timeout_s: float):
        stem = self.work / f"{_slug(case.name)}-mb{micro}"
        cmd = [sys.executable, "-m", "benchmarks.train_step_worker", "--json", f"{stem}.json",
               "--rounds", str(self.setup.rounds), "--warmup", str(self.setup.warmup),
               "--contenders", case.contenders, "--", *train_flags(self.setup, case, micro, stem)]
        env = launch_env(on_gpu=not self.smoke)
        if self.smoke:  # dynamo's import and guards cost seconds per process on CPU; compile cases need it
            env["TORCHDYNAMO_DISABLE"] = "0" if case.compile else "1"
        t0 = time.perf_counter()
        res = run_logged(cmd, env, timeout_s)
        return res, time.perf_counter() - t0

    def _note(self, o: Outcome) -> None:
        self.outcomes.append(o)
        fig = f"micro-batch {o.micro_batch}" if o.status == "ok" else o.detail
        print(f"[{o.status.upper()}] {o.case.name}: {fig} ({o.seconds:.0f}s)", flush=True)


# --------------------------------------------------------------------- report
HEADER = ["case", "engine", "contender", "kernel", "micro", "tokens/s", "MFU", "vs bare: median [min, max]",
          "first s", "peak GiB"]


def table_rows(outcomes: list[Outcome], per_token: int, peak: Optional[float], smoke: bool) -> list[list[str]]:
    rows = []
    for o in outcomes:
        if o.status != "ok":
            continue
        r = o.result
        for name, tps in r["tokens_per_s"].items():
            ratio = r["vs_bare"].get(name)
            vs = ("1 (baseline)" if name == "bare" else
                  f"{ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]" if ratio else "n/a")
            u = "n/a (CPU)" if smoke else ("n/a" if peak is None else _pct(mfu(tps, per_token, peak)))
            mem = f"{r['peak_mem_gib'][name]:.1f}" if name in r.get("peak_mem_gib", {}) else "n/a"
            rows.append([o.case.name, o.case.engine, name, "loop" if name == "bare_loop" else r["kernel"],
                         str(o.micro_batch), f"{tps:,.0f}", u, vs, f"{r['first_s'][name]:.2f}", mem])
    return rows


def markdown_table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)] + ["| " + " | ".join(r) + " |"
                                                                              for r in rows]


def environment(smoke: bool) -> dict:
    import torch

    # The name from a child process: a CUDA context here would hold GPU memory the workers then lack.
    name = "cpu" if smoke else subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"], capture_output=True,
        text=True, timeout=120).stdout.strip() or "unknown CUDA device"
    return {"device": name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "deepspeed": metadata.version("deepspeed"), "machine": platform.node()}


def write_report(out: Path, d: Driver, env: dict, per_token: int, peak: Optional[float], peak_src: str) -> str:
    rows = markdown_table(table_rows(d.outcomes, per_token, peak, d.smoke))
    s = d.setup
    mfu_line = ("MFU: n/a (CPU smoke run)" if d.smoke else
                f"MFU against {peak} TFLOP/s dense bf16 ({peak_src})" if peak else
                f"MFU not computed: the peak FLOP/s of {env['device']!r} is unknown (pass --peak-tflops)")
    lines = [f"# moe_dist GPU throughput, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- device: {env['device']}" + (" (CPU smoke run: no GPU involved)" if d.smoke else "")
             + f"; torch {env['torch']}, CUDA {env['cuda']}, DeepSpeed {env['deepspeed']}; {env['machine']}",
             f"- model: `--preset {s.preset}`, {s.precision}, seq {s.seq_len}, AdamW, global batch = micro-batch "
             f"(largest of {s.micro_batches} that fits), {s.rounds} timed rounds after {s.warmup} warm-up",
             f"- {mfu_line}; FLOPs per token = 6 x N_active + 6 x n_layers x d_model x seq_len "
             f"(causal attention) = {per_token:,}",
             "- vs bare: the bare step's seconds over the contender's, paired within a round (above 1: faster "
             "than the bare loop). first s: the warm-up rounds. peak GiB: the process's "
             "`max_memory_allocated`, both models and both optimizers resident",
             f"- budget: --budget-s {d.budget_s:.0f}, used {time.perf_counter() - d.started:.0f} s", ""]
    lines += rows
    others = [o for o in d.outcomes if o.status != "ok"]
    if others:
        lines += ["", "Not measured:", ""] + [f"- {o.case.name}: {o.status}: {o.detail}" for o in others]
    (out / "gpu_perf.md").write_text("\n".join(lines) + "\n")
    raw = {"environment": env, "setup": asdict(s), "peak_tflops": peak, "flops_per_token": per_token,
           "budget_s": d.budget_s, "outcomes": [asdict(o) for o in d.outcomes]}
    (out / "gpu_perf.json").write_text(json.dumps(raw, indent=1))
    return "\n".join(rows)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _positive(flag: str, example: str):
    def parse(v: str) -> float:
        x = float(v)
        if x <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, found {v}; pass e.g. {flag} {example}")
        return x
    return parse


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_perf", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / f"{datetime.date.today()}-gpu-perf"),
                   help="folder for gpu_perf.md and gpu_perf.json (default benchmarks/results/<today>-gpu-perf)")
    p.add_argument("--budget-s", type=_positive("--budget-s", "480"), default=BUDGET_S,
                   help=f"seconds for the whole run; lower-priority cases are skipped past it (default {BUDGET_S:.0f})")
    p.add_argument("--case-timeout", type=_positive("--case-timeout", "300"), default=CASE_TIMEOUT_S,
                   help=f"seconds one worker may take (default {CASE_TIMEOUT_S:.0f}, and never past the budget)")
    p.add_argument("--peak-tflops", type=_positive("--peak-tflops", "989"),
                   help="dense bf16 TFLOP/s of the GPU, for MFU (default: by device name)")
    p.add_argument("--cpu-smoke", action="store_true", help="the same driver on CPU with a tiny model (CI)")
    p.add_argument("--smoke-compile", action="store_true", help="with --cpu-smoke: run the --compile cases too")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out must be a folder, found the file {out}; pass a folder path")
    if a.smoke_compile and not a.cpu_smoke:
        p.error("--smoke-compile only applies with --cpu-smoke (on a GPU the compile cases always run)")
    if not a.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print(SKIP_LINE)
            return 0
    setup = SMOKE if a.cpu_smoke else GPU
    env = environment(a.cpu_smoke)
    peak, peak_src = (a.peak_tflops, "--peak-tflops") if a.peak_tflops else (peak_for(env["device"]), "by name")
    from moe_dist.config import get_preset
    from moe_dist.plan.param_counts import count_params

    model = get_preset(setup.preset).model
    per_token = flops_per_token(count_params(model).active, model.n_layers, model.d_model, setup.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_perf-") as tmp:
        d = Driver(Path(tmp), setup, a.cpu_smoke, a.budget_s, a.case_timeout, a.smoke_compile)
        d.run_all(CASES)
        table = write_report(out, d, env, per_token, peak, peak_src)
    print(table)
    print(f"gpu_perf: report written to {out / 'gpu_perf.md'}")
    return 1 if any(o.status == "failed" for o in d.outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
