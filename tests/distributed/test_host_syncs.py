"""The step's host-sync budget (``moe_dist/host_syncs.py``), counted in real training runs.

Two depths of the same model, 2 and 4 layers, give the syncs one MoE layer adds per micro-batch:
none without expert parallelism, exactly one with it (the all-to-all split sizes, fetched in one
transfer). What is left is a constant per optimizer step, the same at both depths. A ``.tolist()``
or ``bincount`` put back into the dispatcher or the router fails the first case.
"""

from __future__ import annotations

import pytest

from .trainrun import metrics, train

pytestmark = pytest.mark.distributed

GLOBAL_BATCH = 12  # trainrun.FAST: micro-batch 1, so 12 micro-batches per step over the world
PER_STEP_MAX = 8   # measured 5 on 1 rank (the metrics read-back, DeepSpeed's norm and overflow checks)


def _syncs(tmp, name: str, world: int, layers: int, *args: str) -> list[int]:
    out = tmp / name
    train(out, world, "--max-steps", "2", "--set", f"model.n_layers={layers}", *args,
          env={"MOE_DIST_COUNT_SYNCS": "1"})
    rows = metrics(out)
    assert all(isinstance(r["host_sync_ops"], dict) for r in rows)
    return [r["host_syncs"] for r in rows]


@pytest.mark.parametrize("world, ep, per_layer", [(1, 1, 0), (2, 2, 1)], ids=["local", "ep2"])
def test_sync_budget_per_layer_and_step(tmp_path, world, ep, per_layer):
    shallow = _syncs(tmp_path, "l2", world, 2, "--ep-size", str(ep))
    deep = _syncs(tmp_path, "l4", world, 4, "--ep-size", str(ep))
    micro = GLOBAL_BATCH // world
    for s2, s4 in zip(shallow, deep):
        assert s4 - s2 == 2 * micro * per_layer, (shallow, deep)  # 2 more layers, each micro-batch
        assert s2 - 2 * micro * per_layer <= PER_STEP_MAX, shallow  # the rest is per optimizer step
