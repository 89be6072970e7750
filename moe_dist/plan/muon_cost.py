"""What one Muon step costs: the matrices Muon orthogonalises and the FLOPs of Newton-Schulz on them.

Torch-free (the planner imports it). The FLOP count mirrors DeepSpeed 0.19.8's own code,
``deepspeed/runtime/zero/muon/original_muon.py``, matmul by matmul (2*a*b*c for an (a x b) @ (b x c)
product; the O(numel) elementwise work is left out). DeepSpeed's default ``ns_method`` is ``"gram"``
(moe_dist does not set it): ``zeropower_via_gram_newtonschulz``, which for a square matrix runs the
standard quintic iteration. ``tests/unit/test_layout_search.py`` checks these counts against
``torch.utils.flop_counter`` running DeepSpeed's functions.

Where it runs: with optimizer offload DeepSpeed's ``_apply_muon_updates_cpu_offload`` (ZeRO-2:
``stage_1_and_2.py``, ZeRO-3: ``stage3.py``) copies each full Muon gradient and its momentum to
``get_accelerator().current_device_name()`` and calls ``muon_update`` there: on the GPU for a CUDA
run, on the CPU for a CPU run. Every rank orthogonalises every Muon matrix it holds in that path
(the non-expert ones and its ``E/ep`` experts' ones), not a round-robin share.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

NS_STEPS = 5   # muon_update(..., ns_steps=5), DeepSpeed's default; moe_dist does not change it

# Newton-Schulz FLOP rate of ONE core of this project's CPU, fp32: FLOPs (ns_flops) per second of process
# CPU time of one torch thread running DeepSpeed's muon_update over the 4090 preset's matrices. Measured
# by benchmarks/bench_muon_cpu.py on 2026-11-30 (Intel Xeon, Emerald Rapids, 2 vCPUs under KVM, AVX-512,
# torch 2.13 CPU): 112.7, 120.6 and 125.4 GFLOP per CPU second in three runs, median 120.6
# (benchmarks/results/2026-11-30-muon-cpu/repeats.md). CPU time, not wall time, because the machine is
# shared (load 5-7 on 2 cores throughout): wall time includes waiting for a core. fp32 because DeepSpeed
# computes in it on a CPU without oneDNN fp16 (ns_compute_dtype); on this CPU it picks fp16, which ran
# within 7% of fp32 in each run. Other CPUs differ (cores, AVX-512, memory bandwidth): run the script there.
MUON_CPU_FLOPS_PER_CORE = 120.6e9
MUON_CPU_FLOPS_SOURCE = "one core of an Intel Xeon (Emerald Rapids), fp32"


@dataclass(frozen=True)
class MuonMatrix:
    name: str     # e.g. "attn.wq", "expert.w_up"
    rows: int     # weight shape (out_features, in_features)
    cols: int
    count: int    # how many such matrices in the whole model
    expert: bool  # a routed expert's matrix (split by expert parallelism)


def muon_matrices(m: ModelConfig) -> list[MuonMatrix]:
    """Every 2-D weight Muon trains (``optim.uses_muon``: all matrices but ``embed`` and ``lm_head``)."""
    d, f, L, e, kvd = m.d_model, m.d_ff, m.n_layers, m.num_experts, m.kv_heads * m.head_dim
    qd = m.n_heads * m.head_dim
    if m.fused_qkv:
        out = [MuonMatrix("attn.wqkv", qd + 2 * kvd, d, L, False)]
    else:
        out = [MuonMatrix("attn.wq", qd, d, L, False), MuonMatrix("attn.wk", kvd, d, L, False),
               MuonMatrix("attn.wv", kvd, d, L, False)]
    out += [MuonMatrix("attn.wo", d, qd, L, False), MuonMatrix("router", e, d, L, False)]
    ffn = (["w_gate"] if m.expert_type == "swiglu" else []) + ["w_up"]
    for owner, count, expert in (("expert", L * e, True), ("shared_expert", L * int(m.shared_expert), False)):
        if count:
            out += [MuonMatrix(f"{owner}.{w}", f, d, count, expert) for w in ffn]
            out.append(MuonMatrix(f"{owner}.w_down", d, f, count, expert))
    return out


def ns_flops(rows: int, cols: int, steps: int = NS_STEPS, method: str = "gram") -> int:
    """Matmul FLOPs of DeepSpeed's Newton-Schulz on one (rows x cols) matrix.

    Both methods first transpose a tall matrix, so X is (n x m) with n = min, m = max.
      standard, per step: A = X X^T (2n^2 m), A @ A (2n^3), B @ X (2n^2 m).
      gram (n < m): R = X X^T once; per step Z = bR + cR@R; Q = aQ + Z@Q (not on the step that
        creates Q); R = a(aR + Z@R) + Z@(aR + Z@R) except on the last step and before the restart;
        at the restart (step 2) X = Q@X and R = X X^T again; at the end X = Q@X.
    """
    if method not in ("gram", "standard"):
        raise ValueError(f"method: expected 'gram' or 'standard', found {method!r}")
    n, m = min(rows, cols), max(rows, cols)
    if method == "standard" or n == m:
        return steps * (4 * n * n * m + 2 * n ** 3)
    sq, rect = 2 * n ** 3, 2 * n * n * m      # one n x n product; one n x n by n x m product
    total, restart_at, have_q = rect, 2, False
    for i in range(steps):
        if i == restart_at:
            total += 2 * rect                  # X = Q @ X; R = X @ X^T
            have_q = False
        total += sq                            # R @ R
        if have_q:
            total += sq                        # Z @ Q
        have_q = True
        if i < steps - 1 and i + 1 != restart_at:
            total += 2 * sq                    # Z @ R; Z @ RZ
    return total + rect                        # X = Q @ X


def muon_step_flops(m: ModelConfig, ep_size: int = 1) -> int:
    """Newton-Schulz FLOPs one rank spends per optimizer step in the offload path."""
    return sum(x.count // (ep_size if x.expert else 1) * ns_flops(x.rows, x.cols) for x in muon_matrices(m))


def muon_cpu_seconds(m: ModelConfig, ep_size: int = 1, cores: int = 1) -> float:
    """Seconds of Newton-Schulz per optimizer step at the measured per-core rate, ``cores`` cores at best
    dividing it (torch's intra-op threads; a lower bound for cores > 1, which was not measured here)."""
    return muon_step_flops(m, ep_size) / (MUON_CPU_FLOPS_PER_CORE * cores)


def muon_step_note(m: ModelConfig, ep: int, accelerator: str) -> str:
    """The CPU time of one offloaded Muon step, from DeepSpeed's Newton-Schulz FLOPs and the measured rate."""
    flops = muon_step_flops(m, ep)
    cpu = (f"Muon on CPU: ~{muon_cpu_seconds(m, ep):,.0f} s per optimizer step for these matrices on one core "
           f"({flops / 1e12:.2f} TFLOP of Newton-Schulz per rank at {MUON_CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s, "
           f"measured on {MUON_CPU_FLOPS_SOURCE}, see benchmarks/bench_muon_cpu.py); n cores divide it by at most n")
    if accelerator == "cpu":
        return cpu + "."
    return (cpu + ". With a GPU, DeepSpeed 0.19.8 runs this step on the GPU, not the CPU: its offloaded Muon copies "
            "each Muon gradient and momentum to the accelerator for Newton-Schulz (_apply_muon_updates_cpu_offload).")
