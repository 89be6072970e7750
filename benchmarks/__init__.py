"""Benchmark scripts of moe_dist (not tests): ``python -m benchmarks.run [--quick] [--out DIR] [--only ...]``."""
