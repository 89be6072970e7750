"""ZeRO training state through DCP: save on N ranks / stage a, load on M ranks / stage b.

Every case runs real gloo processes (``zero_dcp_worker`` through ``harness``). A load is checked
three ways: every full fp32 master, optimizer state and scalar equals the saved one bitwise
(gathered with DeepSpeed's own APIs on both sides, and the saved files are checked against the
saving engine); the model weights equal the masters; and, where the function is the same, the
next training step and the loss after it match the saving run within 1e-6, which needs the
optimizer states (Adam moments and step, Muon momentum) to have round-tripped.

``TORCHDYNAMO_DISABLE=1``: DeepSpeed's Muon ``torch.compile``s Newton-Schulz, ~5 s per process
on CPU; eager is the same algorithm and both sides of a comparison run it the same way.
First run on a fresh machine: DeepSpeed JIT-builds its shm-comm, FusedAdam and CPUAdam ops
(~1-2 min in all, cached under ~/.cache/torch_extensions), hence the generous timeouts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .harness import run_and_check

pytestmark = pytest.mark.distributed

WORKER = ["-m", "tests.distributed.zero_dcp_worker"]
ENV = {"TORCHDYNAMO_DISABLE": "1", "DS_ACCELERATOR": "cpu"}
TIMEOUT = 180  # seconds per launch; ~10 s when DeepSpeed's ops are already built


def launch(world: int, mode: str, *args: str, report: Path) -> dict:
    run_and_check([*WORKER, mode, *args, "--report", str(report)], world, TIMEOUT, env=ENV)
    return json.loads(report.read_text())


def save(folder: Path, world: int, *config: str, steps: int = 3) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, ref = str(folder / "ckpt"), str(folder / "ref.pt")
    launch(world, "save", *config, "--steps", str(steps), "--ckpt", ckpt, "--ref", ref, report=folder / "save.json")
    return ckpt, ref


def load(folder: Path, world: int, saved: tuple[str, str], *config: str, name: str) -> dict:
    ckpt, ref = saved
    return launch(world, "load", *config, "--ckpt", ckpt, "--ref", ref, report=folder / f"{name}.json")


@pytest.fixture(scope="module")
def muon_zero2_world2(tmp_path_factory) -> tuple[Path, tuple[str, str]]:
    """ZeRO-2 + DeepSpeed Muon on 2 ranks, 3 steps."""
    folder = tmp_path_factory.mktemp("muon_z2_w2")
    return folder, save(folder, 2, "--stage", "2", "--optimizer", "muon")


@pytest.mark.parametrize("world, config", [
    (3, ["--stage", "2", "--check-errors"]),
    (1, ["--stage", "1"]),
    (2, ["--stage", "2", "--offload", "optimizer"]),  # Muon momentum: whole-param -> partition-aligned layout
    (2, ["--stage", "3"]),                             # ZeRO-3 Muon (the worker sets reduce_scatter: false)
], ids=["zero2-world3", "zero1-world1", "zero2-offload-world2", "zero3-world2"])
def test_muon_zero2_checkpoint_resumes_elsewhere(muon_zero2_world2, world, config):
    folder, saved = muon_zero2_world2
    name = "-".join(config[1:4:2]) + f"-w{world}"
    out = load(folder, world, saved, *config, "--optimizer", "muon", "--compare-losses", name=name)
    assert out["compared"] >= 22  # 8 masters + 5 momenta + 3 x (exp_avg, exp_avg_sq, step)


def test_adamw_zero2_to_zero3_then_zero3_to_zero1_world3(tmp_path):
    """ZeRO-2 world 2 -> ZeRO-3 world 2, which trains a step and saves -> ZeRO-1 world 3."""
    saved = save(tmp_path / "z2", 2, "--stage", "2")
    then = (str(tmp_path / "z3" / "ckpt"), str(tmp_path / "z3" / "ref.pt"))
    (tmp_path / "z3").mkdir()
    out = load(tmp_path, 2, saved, "--stage", "3", "--compare-losses", "--then-save", then[0], "--then-ref", then[1],
               name="z3")
    assert out["compared"] == 32  # 8 masters, 8 x (exp_avg, exp_avg_sq, step)
    load(tmp_path, 3, then, "--stage", "1", "--compare-losses", name="z1")


def test_cpu_offload_zero2_to_zero3_param_and_optimizer_offload(tmp_path):
    """DeepSpeedCPUAdam: ZeRO-2 optimizer offload -> ZeRO-3 param + optimizer offload (saves) -> ZeRO-1."""
    saved = save(tmp_path / "z2", 2, "--stage", "2", "--offload", "optimizer")
    then = (str(tmp_path / "z3" / "ckpt"), str(tmp_path / "z3" / "ref.pt"))
    (tmp_path / "z3").mkdir()
    load(tmp_path, 2, saved, "--stage", "3", "--offload", "all", "--compare-losses", "--then-save", then[0],
         "--then-ref", then[1], name="z3")
    load(tmp_path, 1, then, "--stage", "1", "--compare-losses", name="z1")


def test_expert_params_held_by_one_rank_each(tmp_path):
    """Expert parallelism over 2 ranks: experts.0 lives on rank 0 only, experts.1 on rank 1 only
    (DeepSpeed expert groups); a world-1 run without EP holds both and gets both back."""
    saved = save(tmp_path / "ep", 2, "--stage", "2", "--optimizer", "muon", "--ep", "--check-errors")
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(saved[0]).read_metadata().state_dict_metadata
    for e in (0, 1):
        chunks = md[f"model.experts.{e}.weight"].chunks
        assert [(list(c.offsets), list(c.sizes)) for c in chunks] == [([0, 0], [11, 11])]  # one rank, whole
    out = load(tmp_path, 1, saved, "--stage", "1", "--optimizer", "muon", name="w1")
    assert out["compared"] == 22


@pytest.mark.parametrize("config", [["--stage", "2", "--optimizer", "muon"], ["--stage", "3"]],
                         ids=["zero2-muon", "zero3-adamw"])
def test_materialized_optimizer_states_train_like_lazy_ones(tmp_path, config):
    """Materialising states (zero-lr step, undone) then training == training a fresh engine, bitwise."""
    launch(2, "materialize", *config, report=tmp_path / "m.json")


def test_checkpoint_saved_before_any_step_loads_weights_only(tmp_path):
    saved = save(tmp_path / "w", 2, "--stage", "1", steps=0)
    out = load(tmp_path, 1, saved, "--stage", "3", "--expect-no-optim", "--compare-losses", name="w1")
    assert out["compared"] == 8


def test_missing_model_key_names_key_and_path(muon_zero2_world2):
    from moe_dist.checkpoint.errors import CheckpointError
    from moe_dist.checkpoint.dcp_state import read_saved_keys

    _, (ckpt, _) = muon_zero2_world2
    keys = read_saved_keys(ckpt)
    assert keys.has_optimizer_states and "optim.state.hid.weight.momentum_buffer" in keys
    keys.require_model("hid.weight", (11, 13))
    with pytest.raises(CheckpointError, match=r"no weights for parameter 'extra\.weight' \(key 'model\.extra\."):
        keys.require_model("extra.weight", (4,))
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}: 'model.hid.weight' has shape (11, 13) in the "
                                                        "checkpoint but the parameter has shape (13, 11)")):
        keys.require_model("hid.weight", (13, 11))
    with pytest.raises(CheckpointError, match="cannot read the DCP metadata"):
        read_saved_keys(str(Path(ckpt).parent / "nowhere"))


# ----------------------------------------------------------------------------- layout checks, no processes
def _spans(*parts):
    from moe_dist.checkpoint.dcp_state import _Span

    return [_Span(key, off, n, (numel,), "float32", "cpu") for key, off, n, numel in parts]


def test_layout_accepts_fragments_that_tile_the_parameter():
    from moe_dist.checkpoint.dcp_state import _gather_layout

    layout = _gather_layout(_spans(("model.w", 5, 8, 13), ("model.w", 0, 5, 13), ("model.b", 0, 3, 3)), None, None)
    assert [sp.offset for _, sp in layout["model.w"]] == [0, 5]


@pytest.mark.parametrize("parts, message", [
    ([("model.w", 0, 8, 13), ("model.w", 5, 8, 13)], r"fragment \[5, 13\) overlaps element 8.*global index"),
    ([("model.w", 0, 5, 13), ("model.w", 6, 7, 13)], r"fragment \[6, 13\) leaves a gap before element 5"),
    ([("model.w", 0, 5, 13)], r"model.w: fragments cover 5 of 13 elements"),
    ([("model.w", 0, 5, 13), ("model.w", 5, 8, 14)], r"ranks disagree on the parameter's shape \(\[\(13,\), \(14,\)\]\)"),
], ids=["overlap", "gap", "short", "size"])
def test_layout_rejects_inconsistent_fragments(parts, message):
    from moe_dist.checkpoint.errors import CheckpointError
    from moe_dist.checkpoint.dcp_state import _gather_layout

    with pytest.raises(CheckpointError, match=message):
        _gather_layout(_spans(*parts), None, None)


def test_one_rank_failure_is_raised_with_its_rank():
    from moe_dist.checkpoint.errors import CheckpointError
    from moe_dist.checkpoint.dcp_state import _gather_layout

    with pytest.raises(CheckpointError, match=r"rank 0: KeyError: 'exp_avg'"):
        _gather_layout([], None, KeyError("exp_avg"))
