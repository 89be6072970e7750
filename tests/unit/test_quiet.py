"""The quiet console drops exactly the third-party lines it lists, and nothing else."""

from __future__ import annotations

import io

from moe_dist.run.quiet import QuietStream
from moe_dist.run.cli import parse


def test_listed_lines_are_dropped_and_the_rest_passes():
    inner = io.StringIO()
    out = QuietStream(inner)
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", file=out)
    print("step 1 loss 5.0", file=out)
    out.write("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully and more\n")
    out.write("\r progress")
    out.write("\n")
    assert inner.getvalue() == ("step 1 loss 5.0\nDeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built "
                                "successfully and more\n\r progress\n")
    assert out.dropped == 1


def test_verbose_flag():
    assert parse(["--verbose"])[0].verbose is True and parse([])[0].verbose is False
