"""``parallel.compile``: regional compilation, each transformer block on its own (``Module.compile``).

Regional, as torchtitan does: every block is the same code, so dynamo traces it once and the other
blocks reuse the graph (parameters are graph inputs), and compile time does not grow with depth.
``Module.compile`` compiles in place: parameter and ``state_dict`` names stay as they are (no
``_orig_mod.``), so checkpoints are the same with and without it. Applied after the model is built
and before the engine wraps it.

Randomness: inductor generates its own random numbers unless ``fallback_random`` is set; with it,
router noise (and every other draw) comes from torch's generator as in eager mode, so a compiled
run sees the noise an eager run sees (``tests/distributed/test_compile.py`` measures the rest).

Graph breaks that remain by design: expert parallelism's split sizes (a host value the all-to-all
needs), and, outside bf16, the grouped GEMM (``model/experts.py``: the compiler traces it in bf16 only).
"""

from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module) -> int:
    """Compile each of ``model.layers`` in place; returns how many."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    for block in model.layers:
        block.compile()
    return len(model.layers)
