"""How far DeepSpeed's Muon orthogonalisation is from the seed trainer's, in the dtypes each uses on a GPU.

    python -m benchmarks.seed_muon_precision

The seed's Muon runs the standard quintic Newton-Schulz (5 steps) in bf16; DeepSpeed's (what moe_dist
trains with) runs its Gram Newton-Schulz in fp16 on a GPU (fp32 on a CPU: ``ns_compute_dtype``).
For the ``4090`` preset's Muon shapes, on a random gradient, it prints each one's relative Frobenius
distance to the same iteration in fp64: the gap between the two optimizers is the seed's bf16 rounding.
Runs on the CPU (bf16/fp16 matmuls emulated there are the same roundings). Measured 2026-12-03: seed
bf16 1.9-4.0e-02, DeepSpeed fp16 2.4-4.1e-03, DeepSpeed fp32 7e-07-7e-05; seed vs DeepSpeed fp16
1.9-4.2e-02 (the router's 8 x 1024 the largest).
"""

from __future__ import annotations

import torch

SHAPES = [(1024, 1024), (3072, 1024), (2752, 1024), (1024, 2752), (8, 1024)]  # 4090: wo, wqkv, experts, router


def seed_ns(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The seed's Newton-Schulz in ``dtype`` (the tests' reference, ``tests/seed_reference.py``), as fp64."""
    from tests.seed_reference import seed_newton_schulz

    return seed_newton_schulz(g, dtype).double()


def deepspeed_ns(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import deepspeed.runtime.zero.muon.original_muon as om

    saved = om.ns_compute_dtype
    om.ns_compute_dtype = lambda _method: dtype
    try:
        fn = om.zeropower_via_gram_newtonschulz
        return getattr(fn, "_torchdynamo_orig_callable", fn)(g, 5).double()
    finally:
        om.ns_compute_dtype = saved


def main() -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape in SHAPES:
        g = torch.randn(*shape, generator=gen, device="cpu")
        exact = seed_ns(g, torch.float64)

        def rel(x: torch.Tensor, y: torch.Tensor = exact) -> float:
            return float((x - y).norm() / y.norm())

        seed, ds16, ds32 = seed_ns(g, torch.bfloat16), deepspeed_ns(g, torch.float16), deepspeed_ns(g, torch.float32)
        print(f"{str(shape):>13}: seed bf16 {rel(seed):.2e}, DeepSpeed fp16 {rel(ds16):.2e}, DeepSpeed fp32 "
              f"{rel(ds32):.2e} (vs fp64); seed vs DeepSpeed fp16 {rel(seed, ds16):.2e}")


if __name__ == "__main__":
    main()
