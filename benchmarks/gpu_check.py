"""The GPU acceptance check: the first thing to run on a new GPU machine or cluster node.

    python -m benchmarks.gpu_check                 # on a machine with CUDA GPUs, ~10 min on one H200
    python -m benchmarks.gpu_check --out report.md --peak-tflops 989

Every case is a real ``accelerate launch moe_dist/train.py`` (or ``moe-consolidate`` / ``moe-generate``)
subprocess, so it runs the code users run: NCCL, bf16, CUDA tensors. It checks, and writes a
Markdown report of:

1. ``tiny`` and ``100m``, bf16 ZeRO-2 on 1 GPU: the loss falls; tokens/s and MFU.
2. ``4090`` under ``launch_configs/4090_offload.yaml``: a few steps; the measured
   ``torch.cuda.max_memory_allocated`` against ``moe-plan``'s GPU figure for the same layout (ratio).
3. With 2 or more GPUs: EP 2 against EP 1 (fp32, AdamW): the same losses.
4. A checkpoint saved on GPU, resumed on CPU processes (gloo), and back on GPU: one row per step,
   the same tokens, losses that continue the uninterrupted GPU run.
5. ``moe-consolidate`` of the GPU checkpoint and ``moe-generate --device cuda``.

Where there is no CUDA device it prints one line saying so and exits 0. ``--cpu-smoke`` runs the
same orchestration on CPU processes with a shrunken tiny model (cases 1, 3, 4 and 5; case 2 needs
CUDA memory statistics): that is how CI checks this script on a machine without a GPU
(``tests/distributed/test_gpu_check.py``). Exit code: 0 when every case passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(REPO_ROOT / "moe_dist" / "train.py")
CONFIGS = REPO_ROOT / "launch_configs"

# Dense bf16 peak per GPU (vendor datasheets, without sparsity), for MFU; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
                    "RTX 4090": 165.2, "RTX 6000 Ada": 364.0}
# The CPU smoke's model: the tiny preset shrunk so a step takes ~0.1 s on one core.
SMOKE_MODEL = ["--set", "model.d_model=64", "--set", "model.d_ff=64", "--set", "model.n_heads=2",
               "--set", "train.seq_len=32", "--set", "model.max_seq_len=32", "--set", "data.max_corpus_bytes=300000",
               "--set", "train.global_batch_size=4", "--set", "train.warmup_steps=2"]
EP_REL_BOUND = 1e-4      # EP 2 vs EP 1 loss, relative (CUDA's index_add_ is not bitwise deterministic)
CHAIN_REL_BOUND = 0.05   # a leg on another device draws other router noise and runs another precision
STEP_TIMEOUT_S = 600     # one launch's limit; --case-timeout overrides
FAIL_LOG_LINES = 40      # lines of a failed launch's output printed as it fails (the report keeps 6)


@dataclass
class Case:
    name: str
    ok: Optional[bool]          # None: skipped
    detail: str
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


class Checker:
    """Runs the cases; ``smoke`` swaps GPUs for CPU processes and the presets for a tiny model."""

    def __init__(self, work: Path, smoke: bool, peak_tflops: Optional[float],
                 timeout_s: float = STEP_TIMEOUT_S) -> None:
        self.work, self.smoke, self.timeout_s = work, smoke, timeout_s
        self.cases: list[Case] = []
        import torch

        self.gpus = 0 if smoke else torch.cuda.device_count()
        self.gpu_name = "cpu" if smoke else torch.cuda.get_device_name(0)
        self.peak = peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in self.gpu_name), None)
        self.unit = "CPU process" if smoke else "GPU"
        self.short = 2 if smoke else 3  # steps per chain leg

    # ----------------------------------------------------------------- running things
    def _env(self, on_gpu: bool) -> dict[str, str]:
        return launch_env(on_gpu)

    def train(self, out: Path, procs: int, *args: str, on_gpu: bool = True,
              config: str = "gpu.yaml") -> subprocess.CompletedProcess:
        on_gpu = on_gpu and not self.smoke
        yaml = CONFIGS / (config if on_gpu else "cpu.yaml")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml),
               "--num_processes", str(procs), "--main_process_port", str(_free_port()), TRAIN,
               "--output-dir", str(out), "--set", "train.eval_every=0", *(SMOKE_MODEL if self.smoke else []), *args]
        return self._run(cmd, self._env(on_gpu))

    def tool(self, module: str, *args: str, on_gpu: bool = True) -> subprocess.CompletedProcess:
        return self._run([sys.executable, "-m", module, *args], self._env(on_gpu and not self.smoke))

    def _run(self, cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        return run_logged(cmd, env, self.timeout_s)

    def record(self, case: Case, started: float) -> None:
        case.seconds = time.perf_counter() - started
        self.cases.append(case)
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[case.ok]
        print(f"[{mark}] {case.name}: {case.detail} ({case.seconds:.0f}s)", flush=True)

    # ----------------------------------------------------------------- the cases
    def loss_falls(self, preset: str, steps: int) -> None:
        t0 = time.perf_counter()
        name = f"{preset} {'fp32' if self.smoke else 'bf16'} ZeRO-2, 1 {self.unit}"  # precision auto: bf16 on GPU
        out = self.work / f"train-{preset}"
        res = self.train(out, 1, "--preset", preset, "--max-steps", str(steps), "--zero-stage", "2")
        if res.returncode:
            return self.record(Case(name, False, _tail(res)), t0)
        rows = _metrics(out)
        first, last = rows[0]["loss"], statistics.mean(r["loss"] for r in rows[-3:])
        tps = statistics.median(r["tokens_per_s"] for r in rows[1:])
        mfu = self.mfu(preset, tps, 1)
        ok = last < 0.9 * first
        self.record(Case(name, ok,
                         f"loss {first:.3f} -> {last:.3f}, {tps:,.0f} tokens/s, MFU {_pct(mfu)}",
                         {"loss_first": first, "loss_last3": last, "tokens_per_s": tps, "mfu": mfu}), t0)

    def mfu(self, preset: str, tokens_per_s: float, gpus: int) -> Optional[float]:
        """6 x active parameters + 12 x layers x d_model x seq_len FLOPs per token (forward + backward,
        attention scores and values included), over the GPUs' dense bf16 peak."""
        if self.peak is None or self.smoke:
            return None
        from moe_dist.config import get_preset
        from moe_dist.plan.param_counts import count_params

        cfg = get_preset(preset)
        active = count_params(cfg.model).active
        per_token = 6 * active + 12 * cfg.model.n_layers * cfg.model.d_model * cfg.train.seq_len
        return tokens_per_s * per_token / (gpus * self.peak * 1e12)

    def memory_vs_plan(self) -> None:
        t0 = time.perf_counter()
        name = "4090 preset, 4090_offload (ZeRO-3, param + optimizer offload)"
        if self.smoke:
            return self.record(Case(name, None, "needs CUDA memory statistics"), t0)
        out = self.work / "train-4090"
        res = self.train(out, 1, "--preset", "4090", "--max-steps", "3", config="4090_offload.yaml")
        if res.returncode:
            return self.record(Case(name, False, _tail(res)), t0)
        measured = max(r["gpu_mem_peak_mb"] for r in _metrics(out)) * 2**20
        planned = self.planned_gpu_bytes("4090", CONFIGS / "4090_offload.json")
        ratio = measured / planned
        # The plan adds the CUDA context and fragmentation that max_memory_allocated does not see,
        # so it should sit above the measurement; far above means the planner wastes the GPU.
        ok = 0.3 <= ratio <= 1.0
        self.record(Case(name, ok, f"max_memory_allocated {measured / 2**30:.2f} GiB, moe-plan {planned / 2**30:.2f} "
                                   f"GiB, ratio {ratio:.2f}", {"measured_bytes": measured, "planned_bytes": planned,
                                                               "ratio": ratio}), t0)

    @staticmethod
    def planned_gpu_bytes(preset: str, launch_json: Path) -> int:
        from moe_dist.config import get_preset
        from moe_dist.parallel.deepspeed.config import read_launch_json
        from moe_dist.plan.memory import Hardware, plan

        import torch

        hw = Hardware(gpu_mem=torch.cuda.get_device_properties(0).total_memory, cpu_mem=1 << 50)
        return plan(get_preset(preset), hw, read_launch_json(str(launch_json))).gpu.total

    def ep_matches(self) -> None:
        t0 = time.perf_counter()
        name = f"EP 2 vs EP 1, 2 {'CPU processes' if self.smoke else 'GPUs'}, fp32 AdamW"
        if not self.smoke and self.gpus < 2:
            return self.record(Case(name, None, f"needs 2 GPUs, found {self.gpus}"), t0)
        steps = self.short + 2
        common = ["--preset", "tiny", "--max-steps", str(steps), "--zero-stage", "2", "--set", "parallel.precision=fp32",
                  "--set", "train.optimizer=adamw"]
        runs = {}
        for ep in (1, 2):
            out = self.work / f"ep{ep}"
            res = self.train(out, 2, *common, "--ep-size", str(ep))
            if res.returncode:
                return self.record(Case(name, False, f"EP {ep}: {_tail(res)}"), t0)
            runs[ep] = [r["loss"] for r in _metrics(out)]
        worst = max(abs(a - b) / abs(a) for a, b in zip(runs[1], runs[2]))
        self.record(Case(name, worst <= EP_REL_BOUND and len(runs[1]) == len(runs[2]) == steps,
                         f"largest relative loss difference {worst:.2e} (bound {EP_REL_BOUND:.0e})",
                         {"max_rel_diff": worst}), t0)

    def device_round_trip(self) -> None:
        """GPU (1 process) -> CPU (2 processes) -> GPU: the same checkpoint folder, three jobs."""
        t0 = time.perf_counter()
        name = f"checkpoint {self.unit} -> CPU processes -> {self.unit}"
        n = self.short
        common = ["--preset", "tiny", "--max-steps", str(3 * n), "--save-every", str(n), "--zero-stage", "2"]
        ref, out = self.work / "chain-ref", self.work / "chain"
        legs = [("uninterrupted", ref, 1, True, []), (f"to step {n}", out, 1, True, ["--stop-at-step", str(n)]),
                (f"CPU to step {2 * n}", out, 2, False, ["--stop-at-step", str(2 * n), "--resume", "auto"]),
                (f"to step {3 * n}", out, 1, True, ["--resume", "auto"])]
        for leg, folder, procs, on_gpu, extra in legs:
            res = self.train(folder, procs, *common, *extra, on_gpu=on_gpu)
            if res.returncode:
                return self.record(Case(name, False, f"{leg}: {_tail(res)}"), t0)
        a, b = {r["step"]: r for r in _metrics(ref)}, _metrics(out)
        steps_ok = [r["step"] for r in b] == list(range(1, 3 * n + 1))
        tokens_ok = all(r["tokens"] == a[r["step"]]["tokens"] for r in b)
        worst = max(abs(r["loss"] - a[r["step"]]["loss"]) / a[r["step"]]["loss"] for r in b)
        self.record(Case(name, steps_ok and tokens_ok and worst <= CHAIN_REL_BOUND,
                         f"steps 1-{3 * n} once each: {steps_ok}, tokens equal: {tokens_ok}, largest relative loss "
                         f"difference to the uninterrupted run {worst:.2e} (bound {CHAIN_REL_BOUND})",
                         {"max_rel_diff": worst}), t0)
        self.chain = out

    def consolidate_and_generate(self) -> None:
        t0 = time.perf_counter()
        name = "moe-consolidate + moe-generate --device " + ("cpu" if self.smoke else "cuda")
        ckpt = getattr(self, "chain", self.work / "chain") / "checkpoints" / "checkpoint_latest"
        if not ckpt.exists():
            return self.record(Case(name, False, f"no checkpoint at {ckpt} (the round-trip case failed)"), t0)
        pt = self.work / "model.pt"
        res = self.tool("moe_dist.export.consolidate_cli", str(ckpt), "-o", str(pt), "--dtype", "bf16", "--verify", "-q",
                        "--force")
        if res.returncode:
            return self.record(Case(name, False, _tail(res)), t0)
        res = self.tool("moe_dist.export.inference", str(pt), "--prompt", "def ", "--max-new-tokens", "16",
                        "--device", "cpu" if self.smoke else "cuda")
        text = res.stdout.strip()
        self.record(Case(name, res.returncode == 0 and len(text) > len("def"),
                         f"generated {text[:40]!r}" if res.returncode == 0 else _tail(res)), t0)

    # ----------------------------------------------------------------- report
    def report(self, path: Path) -> None:
        lines = [f"# moe_dist GPU check, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
                 f"- machine: {platform.node()}, {self.gpus} x {self.gpu_name}"
                 + (" (CPU smoke run: no GPU involved)" if self.smoke else ""),
                 f"- peak bf16 TFLOP/s per GPU used for MFU: {self.peak or 'unknown (pass --peak-tflops)'}",
                 "", "| case | result | detail | seconds |", "|---|---|---|---|"]
        for c in self.cases:
            mark = {True: "PASS", False: "FAIL", None: "SKIP"}[c.ok]
            detail = c.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {c.name} | {mark} | {detail} | {c.seconds:.0f} |")
        lines += ["", "```json", json.dumps({c.name: c.figures for c in self.cases}, indent=1), "```", ""]
        path.write_text("\n".join(lines))


def launch_env(on_gpu: bool) -> dict[str, str]:
    """The environment of a launch: this checkout first on the path; off the GPU, CPU processes only."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    if not on_gpu:  # CPU processes on a GPU machine: hide the GPUs, DeepSpeed's CPU accelerator, gloo
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def run_logged(cmd: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run one launch (exit 124 when it times out); a failed one prints the end of its output at once
    (a report line holds 6 lines)."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        res = subprocess.CompletedProcess(cmd, 124, out, err + f"\ntimed out after {timeout_s:.0f} s")
    if res.returncode:
        lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()][-FAIL_LOG_LINES:]
        print(f"--- exit {res.returncode}: {' '.join(cmd[-12:])}\n" + "\n".join(lines) + "\n---", flush=True)
    return res


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _tail(res: subprocess.CompletedProcess, n: int = 6) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    return f"exit {res.returncode}: " + " / ".join(lines[-n:])


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2g}%"  # 2 significant digits: small presets sit far below 1%


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check_report.md", help="Markdown report (default gpu_check_report.md)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s of one GPU, for MFU (default: by name)")
    p.add_argument("--cpu-smoke", action="store_true", help="run the orchestration on CPU processes (CI)")
    p.add_argument("--work", help="keep the runs in a new gpu_check-<time> folder here (default: a temporary folder)")
    p.add_argument("--case-timeout", type=float, default=STEP_TIMEOUT_S,
                   help=f"seconds one launch may take before it counts as failed (default {STEP_TIMEOUT_S})")
    a = p.parse_args(argv)
    if not a.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False); "
                  "run it on a GPU machine, or pass --cpu-smoke to check the script itself on CPU")
            return 0
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        # A fresh folder per check inside --work: a second check must not find the first one's run
        # folders (train.py refuses to start a fresh run where a run already is).
        work = Path(a.work) / datetime.datetime.now().strftime("gpu_check-%Y%m%d-%H%M%S") if a.work else Path(tmp)
        checker = Checker(work, a.cpu_smoke, a.peak_tflops, a.case_timeout)
        checker.work.mkdir(parents=True, exist_ok=True)
        checker.loss_falls("tiny", 12 if a.cpu_smoke else 30)
        if not a.cpu_smoke:
            checker.loss_falls("100m", 20)
        checker.memory_vs_plan()
        checker.ep_matches()
        checker.device_round_trip()
        checker.consolidate_and_generate()
        checker.report(Path(a.out))
    print(f"gpu_check: report written to {a.out}")
    return 0 if all(c.ok is not False for c in checker.cases) else 1


if __name__ == "__main__":
    sys.exit(main())
