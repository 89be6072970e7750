"""``--compile`` (regional: each block) trains under DeepSpeed ZeRO-2 and FSDP2 as eager does: the
same losses within COMPILE_REL (measured on this CPU in fp32: at most 1.5e-8 relative over 3 steps
under ZeRO-2, 0 under FSDP2), and checkpoints with the same keys and shapes (no ``_orig_mod.``).

Slow by nature (inductor compiles a block in tens of seconds here), so one small case per engine,
in the slow set.
"""

from __future__ import annotations

import pytest

from moe_dist.checkpoint.saved_keys import read_saved_keys

from .trainrun import losses, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
COMPILE_REL = 1e-6
DYNAMO_ON = {"TORCHDYNAMO_DISABLE": "0"}  # trainrun turns dynamo off for speed; compile needs it


@pytest.mark.parametrize("engine", [["--zero-stage", "2"], ["--engine", "fsdp2"]], ids=["zero2", "fsdp2"])
def test_compiled_blocks_train_like_eager(tmp_path, engine):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    for out, extra in ((eager, []), (compiled, ["--compile"])):
        train(out, 1, "--max-steps", str(STEPS), "--save-every", str(STEPS), *engine, *extra, env=DYNAMO_ON,
              timeout=900)
    a, b = losses(eager), losses(compiled)
    assert len(a) == len(b) == STEPS
    for s, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= COMPILE_REL * abs(x), f"step {s}: eager {x} vs compiled {y}"
    ck = f"checkpoints/checkpoint_step_{STEPS}"
    assert read_saved_keys(str(eager / ck)).sizes == read_saved_keys(str(compiled / ck)).sizes
