"""Every process group gets the configured collective timeouts: the init timeout at start, the train
timeout once the first step is done; DeepSpeed's expert / expert-data groups and FSDP2's mesh groups
included (each made with the backend's 30-minute default), DCP's checkpoint group kept on the init one."""

from __future__ import annotations

import json

import pytest

from moe_dist.run.watchdog import COLLECTIVE_BACKSTOP

from .harness import check_ranks, run_ranks
from .trainrun import CPU_JSON, FAST, TRAIN

pytestmark = pytest.mark.distributed

# Before steps 1 and 2 (rank 0): the gloo timeout of every group, and of the checkpoint group.
_WRAPPER = """
import json, os, runpy, sys
import moe_dist.run.trainer as trainer
from moe_dist.parallel.timeouts import every_group, pg_timeout_s
seen = {}
step_once = trainer.Trainer.train_step
def hooked(self):
    if os.environ.get("RANK", "0") == "0" and self.state.step < 2:
        seen[self.state.step] = {"groups": [pg_timeout_s(g) for g in every_group()],
                                 "checkpoint": pg_timeout_s(self.watch.keep_groups[0])}
        with open(os.environ["TEST_OUT"], "w") as f:
            json.dump(seen, f)
    return step_once(self)
trainer.Trainer.train_step = hooked
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_every_group_gets_the_timeouts(tmp_path, engine):
    out = tmp_path / "seen.json"
    engine_args = ["--deepspeed-config", CPU_JSON] if engine == "deepspeed" else ["--engine", "fsdp2"]
    argv = ["-c", _WRAPPER, TRAIN, *engine_args, *FAST, "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
            "--ep-size", "2", "--set", "parallel.init_timeout_s=123", "--set", "parallel.train_timeout_s=45"]
    check_ranks(run_ranks(argv, 2, timeout=180, env={"TEST_OUT": str(out), "TORCHDYNAMO_DISABLE": "1"}))
    seen = json.loads(out.read_text())
    start, training = seen["0"], seen["1"]
    # the world, the checkpoint manager's two, and the engine's own (DeepSpeed's EP groups, FSDP2's meshes)
    assert len(start["groups"]) >= 4, start
    assert set(start["groups"]) == {123.0}, start  # none left on the backend's 1800 s
    assert training["checkpoint"] == 123.0 and training["groups"].count(123.0) == 1, training  # DCP's group only
    backstop = 45.0 * COLLECTIVE_BACKSTOP  # the watchdog fires at 45 s first
    assert training["groups"].count(backstop) == len(training["groups"]) - 1, training
