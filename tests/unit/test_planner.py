"""moe-plan: parameter counts, DeepSpeed's own estimators, phases, CLI, and a measured RSS check.

The DeepSpeed comparison configures the planner the way ``estimate_zero{2,3}_model_states_mem_needs``
assume: AdamW (fp32 master + 2 states), a 16-bit working copy, no grad accumulation, no EP,
``additional_buffer_factor`` 1.5 on host figures, and (ZeRO-3) the whole fp32 gradient partition at
once (``sub_group_size`` >= P). Two differences are real and pinned down here rather than tuned away:

* ZeRO-3 allocates a 16-bit gradient partition (``stage3.py: grad_partitions_flat_buffer``, 2 B/param
  of the partition, on CPU when the optimizer is offloaded) that the estimator leaves out;
* the ZeRO-2 offload estimate counts ``4 * total_gpus`` fp32 model loads on *one* node's CPU (its
  non-offload branch uses ``num_gpus_per_node``), so on 2 nodes it is exactly 2x the node-local figure.
"""

from __future__ import annotations

import dataclasses

import json
import re

import pytest

from moe_dist.config import ConfigError, RunConfig, apply_overrides, get_preset
from moe_dist.plan.param_counts import count_params
from moe_dist.plan.cli import build_parser, main
from moe_dist.plan.memory import GiB, MODEL_STATE, Consumer, Hardware, peak, plan
from moe_dist.plan.units import parse_bytes

ds_z2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
ds_z3 = pytest.importorskip("deepspeed.runtime.zero.stage3")

DS_OMITTED = "gradients (bf16 partition buffer)"   # ZeRO-3 grad_partitions_flat_buffer


def run_cfg(preset: str, world: int, **over) -> RunConfig:
    """A preset with overrides and grad accumulation 1 on ``world`` ranks."""
    cfg = get_preset(preset)
    over = {k.replace("__", "."): v for k, v in over.items()}
    over.setdefault("train.global_batch_size", over.get("train.micro_batch_size", cfg.train.micro_batch_size) * world)
    return apply_overrides(cfg, over)


# --------------------------------------------------------------------------- DeepSpeed's estimators
CASES = [  # (stage, offload_optimizer, offload_params, zero_init = our sharded build)
    (2, True, False, False), (2, False, False, False),
    (3, True, True, True), (3, True, True, False), (3, True, False, True), (3, True, False, False),
    (3, False, False, True), (3, False, False, False),
]


def _ours_vs_theirs(preset, gpn, nodes, stage, oo, op, zi):
    cfg = run_cfg(preset, gpn * nodes, parallel__zero_stage=stage, parallel__offload_optimizer=oo,
                  parallel__offload_params=op, parallel__ep_size=1, train__optimizer="adamw",
                  parallel__precision="bf16", parallel__sharded_build=zi)
    launch = {"zero_optimization": {"stage": stage, "sub_group_size": 10**13}}
    pl = plan(cfg, Hardware(80 * GiB, 4096 * GiB, gpn, nodes, host_buffer_factor=1.5), launch)
    P, LL = pl.params.total, pl.params.largest_module
    if stage == 2:
        cpu, gpu = ds_z2.estimate_zero2_model_states_mem_needs(P, gpn, nodes, cpu_offload=oo)
    else:
        cpu, gpu, _ = ds_z3.estimate_zero3_model_states_mem_needs(P, LL, gpn, nodes, cpu_offload=oo,
                                                                   cpu_offload_params=op, zero_init=zi)
    return pl, cpu, gpu


def _states_without(rep, omitted: str) -> int:
    """Our model-state peak with one named row left out."""
    return peak([c for c in rep.consumers if c.category in MODEL_STATE and not c.name.startswith(omitted)])


def _ds_style(rep) -> int:
    """Our model-state rows counted DeepSpeed's way: its estimator sums backward-time and step-time
    buffers (no phases, except start-up vs training) and leaves out ZeRO-3's 16-bit grad partition."""
    rows = [c for c in rep.consumers if c.category in MODEL_STATE and not c.name.startswith(DS_OMITTED)]
    by = {p: sum(c.bytes for c in rows if c.phase == p) for p in ("always", "init", "train", "fwd/bwd", "step")}
    return by["always"] + max(by["init"], by["train"] + by["fwd/bwd"] + by["step"])


PARAMS = pytest.mark.parametrize("preset,gpn,nodes,stage,oo,op,zi", [
    (p, g, n, *c) for p in ("4090", "18b") for g, n in ((1, 1), (8, 2)) for c in CASES])


@PARAMS
def test_model_states_agree_with_deepspeed(preset, gpn, nodes, stage, oo, op, zi):
    """Our real peak within 10% of DeepSpeed's, or the gap is one of the two documented differences."""
    pl, ds_cpu, ds_gpu = _ours_vs_theirs(preset, gpn, nodes, stage, oo, op, zi)
    for ours, theirs, rep in ((pl.gpu.model_states, ds_gpu, pl.gpu), (pl.cpu.model_states, ds_cpu, pl.cpu)):
        if abs(ours / theirs - 1) <= 0.10:
            continue
        if stage == 3:       # ZeRO-3's grad_partitions_flat_buffer, which the estimator leaves out
            assert ours > theirs and _states_without(rep, DS_OMITTED) == pytest.approx(theirs, rel=0.10)
        else:                # ZeRO-2 offload on several nodes: 4 * total_gpus model loads on one node
            assert stage == 2 and oo and nodes > 1 and rep is pl.cpu
            node_local, _ = ds_z2.estimate_zero2_model_states_mem_needs(pl.params.total, gpn, 1, cpu_offload=True)
            assert ours == pytest.approx(node_local, rel=0.10) and theirs == pytest.approx(nodes * node_local)


@PARAMS
def test_model_states_reconcile_term_by_term(preset, gpn, nodes, stage, oo, op, zi):
    """Counted DeepSpeed's way, every term matches (node-local for the multi-node ZeRO-2 offload case)."""
    pl, ds_cpu, ds_gpu = _ours_vs_theirs(preset, gpn, nodes, stage, oo, op, zi)
    if stage == 2 and oo and nodes > 1:
        ds_cpu, _ = ds_z2.estimate_zero2_model_states_mem_needs(pl.params.total, gpn, 1, cpu_offload=True)
    # ZeRO-3 keeps small params (norms) whole on every GPU: DeepSpeed's estimate has no such term.
    persistent = pl.gpu.get("parameters persistent")
    assert _ds_style(pl.gpu) - persistent == pytest.approx(ds_gpu, rel=0.005)
    assert _ds_style(pl.cpu) == pytest.approx(ds_cpu, rel=0.005)


def test_all_cold_prints_the_figures_compared(capsys):
    P, LL = count_params(get_preset("18b").model).total, count_params(get_preset("18b").model).largest_module
    ds_z3.estimate_zero3_model_states_mem_needs_all_cold(P, LL, 8, 2)
    ds_z2.estimate_zero2_model_states_mem_needs_all_cold(P, 8, 2)
    printed = [tuple(map(float, m)) for m in re.findall(r"([\d.]+)GB \|\s+([\d.]+)GB", capsys.readouterr().out)]
    cpu3, gpu3, _ = ds_z3.estimate_zero3_model_states_mem_needs(P, LL, 8, 2, True, True, True)
    cpu2, gpu2 = ds_z2.estimate_zero2_model_states_mem_needs(P, 8, 2, cpu_offload=False)
    assert printed[0] == pytest.approx((cpu3 / GiB, gpu3 / GiB), abs=0.01)
    assert printed[-1] == pytest.approx((cpu2 / GiB, gpu2 / GiB), abs=0.01)


# --------------------------------------------------------------------------- planner behaviour
def test_offload_moves_master_and_states_to_cpu():
    on = plan(run_cfg("4090", 1, parallel__zero_stage=3, parallel__offload_optimizer=True,
                      parallel__offload_params=True), Hardware(24 * GiB, 64 * GiB))
    off = plan(run_cfg("4090", 1, parallel__zero_stage=3, parallel__offload_optimizer=False,
                       parallel__offload_params=False),
               Hardware(24 * GiB, 64 * GiB))
    P = on.params.total
    assert on.gpu.get("master weights") == 0 and on.cpu.get("master weights") == int(4 * P * 1.5)
    assert off.gpu.get("master weights") == 4 * P and off.cpu.get("master weights") == 0
    assert on.gpu.total < off.gpu.total


def test_expert_parallel_divides_expert_params_not_states():
    hw = Hardware(180 * GiB, 2048 * GiB, 8, 2)
    ep1, ep8 = (plan(run_cfg("b200", 16, parallel__ep_size=e), hw) for e in (1, 8))
    pc = ep1.params
    assert ep1.gpu.get("parameters") - ep8.gpu.get("parameters") == pytest.approx(2 * pc.experts * 7 / 8, abs=2)
    assert ep1.gpu.get("optimizer states") == ep8.gpu.get("optimizer states")   # P/N either way
    assert ep8.gpu.get("EP all-to-all") > 0 and ep1.gpu.get("EP all-to-all") == 0


def test_muon_keeps_one_state_for_matrices():
    adam, muon = (plan(run_cfg("b200", 16, train__optimizer=o), Hardware(180 * GiB, 2048 * GiB, 8, 2))
                  for o in ("adamw", "muon"))
    pc = adam.params
    muon_params = pc.attention + pc.router + pc.experts
    saved = adam.gpu.get("optimizer states") - muon.gpu.get("optimizer states")
    assert saved == pytest.approx(4 * muon_params / 16, rel=1e-6)


def test_activation_formula_scales():
    hw = Hardware(180 * GiB, 2048 * GiB, 8, 2)
    acts = lambda pl: sum(c.bytes for c in pl.gpu.consumers if c.category == "activations")  # noqa: E731
    no_ckpt = plan(run_cfg("b200", 16, parallel__activation_checkpointing=False), hw)
    ckpt = plan(run_cfg("b200", 16, parallel__activation_checkpointing=True), hw)
    double = plan(run_cfg("b200", 16, parallel__activation_checkpointing=False, train__micro_batch_size=4), hw)
    head = lambda pl: pl.gpu.get("LM head")  # noqa: E731
    assert acts(ckpt) - head(ckpt) < (acts(no_ckpt) - head(no_ckpt)) / 5
    assert acts(double) == pytest.approx(2 * acts(no_ckpt), rel=1e-6)
    m, s = get_preset("b200").model, no_ckpt.settings
    logits = s.micro_batch * s.seq_len * (m.vocab_size * 14 + 2 * m.d_model * 2)     # bf16: 12 + 2 B per logit
    assert no_ckpt.gpu.get("LM head") == logits


def test_peak_is_init_or_training_not_both():
    rows = [Consumer("base", 1, "overhead", "always"), Consumer("model", 10, "params", "init"),
            Consumer("states", 6, "optimizer", "train"), Consumer("acts", 3, "activations", "fwd/bwd"),
            Consumer("fp32 grads", 2, "grads", "step")]
    assert peak(rows) == 1 + max(10, 6 + 3)


@pytest.mark.parametrize("over,hw,msg", [
    ({"parallel.ep_size": 8}, Hardware(gpus_per_node=4), "divisible by parallel.ep_size"),
    ({"parallel.zero_stage": 2, "parallel.ep_size": 1, "parallel.offload_params": True}, Hardware(), "ZeRO stage 3"),
])
def test_invalid_combinations_raise(over, hw, msg):
    cfg = apply_overrides(get_preset("18b"), {"train.global_batch_size": 256, **over})
    with pytest.raises(ConfigError, match=msg):
        plan(cfg, hw)


# --------------------------------------------------------------------------- CLI
def test_parse_bytes():
    assert parse_bytes("24GB") == parse_bytes("24GiB") == 24 * GiB
    assert parse_bytes("1.5T") == int(1.5 * 2**40) and parse_bytes("1000B") == 1000
    with pytest.raises(ConfigError):
        parse_bytes("lots")
    with pytest.raises(ConfigError, match=r"^--cpu-mem 64: a size needs a unit .*did you mean 64GB\?$"):
        parse_bytes("64", "--cpu-mem")


def test_help_lists_every_flag():
    text = build_parser().format_help()
    for flag in ("--preset", "--zero-stage", "--offload-optimizer", "--offload-params", "--ep-size", "--gpu-mem",
                 "--cpu-mem", "--gpus-per-node", "--nodes", "--micro-batch", "--seq-len",
                 "--activation-checkpointing", "--precision", "--optimizer", "--launch-config"):
        assert flag in text


def test_cli_verdicts_and_exit_code(capsys):
    assert main(["--preset", "4090", "--gpu-mem", "24GB", "--cpu-mem", "64GB"]) == 0
    out = capsys.readouterr().out
    assert out.count("FITS") == 2 and "DOES NOT FIT" not in out and "biggest consumer" in out
    assert main(["--preset", "18b", "--zero-stage", "3", "--offload-optimizer", "--offload-params", "--ep-size", "1",
                 "--gpu-mem", "24GB", "--cpu-mem", "128GB"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["--preset", "18b", "--gpus-per-node", "3"]) == 2     # a user error is not a verdict


def test_cli_reads_launch_json_and_flags_win(tmp_path, capsys):
    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    assert main(["--preset", "tiny", "--launch-config", str(js)]) == 0
    assert "ZeRO-3, offload optimizer," in capsys.readouterr().out
    assert main(["--preset", "tiny", "--launch-config", str(js), "--zero-stage", "2", "--no-offload-optimizer"]) == 0
    assert "ZeRO-2, offload none," in capsys.readouterr().out


# --------------------------------------------------------------------------- measured RSS (stand-in)





def test_b200_18b_launch_config_fits_with_ep_8():
    """launch_configs/b200_18b.json (ZeRO-2, the preset's EP 8) fits 2 x 8 B200 by moe-plan, with the sharded
    build's CPU peak (847 GiB per node with the full fp32 build)."""
    from pathlib import Path

    from moe_dist.parallel.deepspeed.config import read_launch_json

    path = Path(__file__).resolve().parents[2] / "launch_configs" / "b200_18b.json"
    launch = read_launch_json(str(path))
    hw = Hardware(180 * GiB, 2048 * GiB, 8, 2)
    cfg = get_preset("18b")
    assert launch["zero_optimization"]["stage"] == 2 and cfg.parallel.ep_size == 8  # the YAML's command
    pl = plan(cfg, hw, launch)
    assert pl.fits and pl.settings.sharded_build
    assert pl.cpu.total < 64 * GiB  # no rank holds the fp32 model
    full = plan(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sharded_build=False)), hw, launch)
    assert full.cpu.total > 500 * GiB


def test_fsdp2_is_planned_with_zero3_terms(capsys):
    """--engine fsdp2: every rank holds 1/dp of parameters, gradients and optimizer states, as ZeRO-3;
    its one offload policy moves parameters and optimizer states together."""
    hw = Hardware(gpu_mem=80 * GiB, cpu_mem=512 * GiB, gpus_per_node=8)
    base = get_preset("b200")
    z3 = plan(apply_overrides(base, {"parallel.zero_stage": 3}), hw)
    f2 = plan(apply_overrides(base, {"parallel.engine": "fsdp2"}), hw)
    assert f2.settings.engine == "fsdp2" and f2.settings.zero_stage == 3
    assert f2.gpu.total == z3.gpu.total and f2.cpu.total == z3.cpu.total
    off = plan(apply_overrides(base, {"parallel.engine": "fsdp2", "parallel.offload_optimizer": True}), hw).settings
    assert off.offload_optimizer and off.offload_params
    assert main(["--preset", "tiny", "--engine", "fsdp2", "--accelerator", "cpu", "--precision", "fp32"]) == 0
    assert "FSDP2 (sharded as ZeRO-3)" in capsys.readouterr().out
