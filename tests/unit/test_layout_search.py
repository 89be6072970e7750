"""moe-plan --choose / --fit (moe_dist.plan.layout_search) and the Muon cost (moe_dist.plan.muon_cost).

Figures are never restated here: every expectation is derived from ``plan()``, DeepSpeed's own
functions or torch's FLOP counter in the same test.
"""

from __future__ import annotations

from collections import Counter

import pytest

from moe_dist.config import ModelConfig, apply_overrides, get_preset
from moe_dist.plan.layout_search import candidate_layouts, choose, family_depth, fit, scaled
from moe_dist.plan.muon_cost import MUON_CPU_FLOPS_PER_CORE, muon_matrices, muon_step_flops, ns_flops
from moe_dist.plan.cli import build_parser, main
from moe_dist.plan.memory import GiB, Hardware, plan

ONE_4090 = dict(gpu_mem=24 * GiB, gpus_per_node=1)


def words(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- Muon cost
@pytest.mark.parametrize("shape", [(64, 64), (48, 160), (160, 48), (8, 128), (40, 200)])
@pytest.mark.parametrize("method", ["gram", "standard"])
def test_ns_flops_count_deepspeeds_matmuls(shape, method):
    """Our count against torch's FLOP counter running DeepSpeed's own (un-compiled) Newton-Schulz."""
    torch = pytest.importorskip("torch")
    om = pytest.importorskip("deepspeed.runtime.zero.muon.original_muon")
    from torch.utils.flop_counter import FlopCounterMode

    fn = om.zeropower_via_gram_newtonschulz if method == "gram" else om.zeropower_via_newtonschulz5
    fn = getattr(fn, "_torchdynamo_orig_callable", fn)
    with FlopCounterMode(display=False) as counter:
        fn(torch.randn(*shape), 5)
    assert counter.get_total_flops() == ns_flops(*shape, method=method)


@pytest.mark.parametrize("model", [
    ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48, num_experts=4, top_k=2,
                expert_type="silu_mlp"),
    ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=40, num_experts=2, top_k=1,
                expert_type="swiglu", shared_expert=True, tie_embeddings=False),
    ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, num_experts=4, top_k=2,
                expert_type="silu_mlp", fused_qkv=True),
])
def test_muon_matrices_are_the_models_muon_params(model):
    """Every shape Muon gets in the real model (optim.uses_muon), with its count, and nothing else."""
    pytest.importorskip("torch")
    from moe_dist import model as lm
    from moe_dist.run.optim import uses_muon

    from moe_dist.parallel.engine import per_expert_tensors

    net = lm.build(model)
    muon = {n: p for n, p in net.named_parameters() if uses_muon(n, p)}
    real = Counter(tuple(t.shape) for t in per_expert_tensors(net, muon).values())  # Muon runs per expert
    ours = Counter()
    for x in muon_matrices(model):
        ours[(x.rows, x.cols)] += x.count
    assert ours == real
    experts = sum(p.numel() for n, p in net.named_parameters() if uses_muon(n, p) and ".experts." in n)
    assert sum(x.rows * x.cols * x.count for x in muon_matrices(model) if x.expert) == experts


def test_muon_step_flops_split_by_expert_parallelism():
    m = get_preset("4090").model
    experts = sum(x.count * ns_flops(x.rows, x.cols) for x in muon_matrices(m) if x.expert)
    assert muon_step_flops(m, 1) - muon_step_flops(m, 4) == experts * 3 // 4


def test_muon_cpu_line_when_offloading_with_muon(capsys):
    """The line states the FLOP count / the measured rate, on a CUDA and on a CPU plan, only with offload + Muon."""
    m = get_preset("4090").model
    expected = (f"Muon on CPU: ~{muon_step_flops(m) / MUON_CPU_FLOPS_PER_CORE:,.0f} s per optimizer step for these "
                "matrices on one core")
    base = ["--preset", "4090", "--zero-stage", "3", "--gpu-mem", "24GB", "--cpu-mem", "64GB"]
    for extra, shown in ((["--offload-optimizer"], True), (["--offload-optimizer", "--accelerator", "cpu"], True),
                         (["--offload-optimizer", "--optimizer", "adamw"], False), (["--no-offload-optimizer"], False)):
        assert main(base + extra) == 0
        out = words(capsys.readouterr().out)
        assert (expected in out) is shown, (extra, out[-600:])
        if shown and "cpu" not in extra:
            assert "runs this step on the GPU" in out


@pytest.mark.parametrize("precision,copies", [("fp32", 0), ("bf16", 2 * 2)])
def test_offloaded_muon_copies_grads_and_momentum_to_the_gpu(precision, copies):
    """ZeRO-3 offload + Muon on one GPU, all Muon params in one sub_group: DeepSpeed's stage3.py moves the fp32
    grad and momentum partitions to the GPU (8 B/param), then converts both to the gradient-accumulation dtype
    (bf16: 2 x 2 B more; fp32: no copy). AdamW makes no such copies."""
    cfg = get_preset("4090")
    hw = Hardware(**ONE_4090)
    launch = {"zero_optimization": {"stage": 3, "sub_group_size": 10**12}}
    muon, adamw = (plan(apply_overrides(cfg, {"train.optimizer": o, "parallel.offload_optimizer": True,
                                              "parallel.precision": precision}), hw, launch)
                   for o in ("muon", "adamw"))
    n_muon = sum(x.rows * x.cols * x.count for x in muon_matrices(cfg.model))
    assert muon.gpu.get("Muon grads + momentum copied to GPU") == (8 + copies) * n_muon
    assert adamw.gpu.get("Muon grads + momentum copied to GPU") == 0


# --------------------------------------------------------------------------- --choose
def test_candidate_order():
    one, eight = candidate_layouts(8, 1), candidate_layouts(8, 8)
    assert [x.label for x in one] == ["ZeRO-1, EP 1, offload none", "ZeRO-2, EP 1, offload none",
                                      "ZeRO-3, EP 1, offload none", "ZeRO-2, EP 1, offload optimizer",
                                      "ZeRO-3, EP 1, offload optimizer", "ZeRO-3, EP 1, offload optimizer+params"]
    assert {x.ep_size for x in eight} == {1, 2, 4, 8}
    z3 = [x.ep_size for x in eight if x.zero_stage == 3 and not x.offload_optimizer]
    assert z3 == [8, 4, 2, 1]                                                # ZeRO-3: largest EP first
    assert len(set(eight)) == len(eight) and eight[0] == one[0] and eight[-1] == one[-1]


def _check_choice(ch):
    """The chosen layout fits by plan() itself, and every faster one tried did not."""
    assert ch.layout is not None and ch.plan.fits
    assert [lay for lay, _ in ch.tried][-1] == ch.layout
    assert not any(pl.fits for _, pl in ch.tried[:-1])


def test_choose_4090_without_offload_on_one_4090():
    cfg = get_preset("4090")
    for ram in (64, 128):
        ch = choose(cfg, Hardware(**ONE_4090, cpu_mem=ram * GiB))
        _check_choice(ch)
        assert not ch.layout.offload_optimizer and not ch.layout.offload_params
        assert ch.plan.gpu.total <= 24 * GiB


def test_choose_offloads_when_the_gpu_is_too_small():
    """18b on one 24 GB GPU needs offload (given host RAM enough for it); 4090 on an 8 GB GPU too."""
    for preset, gpu, ram in (("18b", 24, 1024), ("4090", 8, 64)):
        ch = choose(get_preset(preset), Hardware(gpu_mem=gpu * GiB, cpu_mem=ram * GiB))
        _check_choice(ch)
        assert ch.layout.offload_optimizer


def test_choose_18b_on_a_4090_box_finds_nothing():
    for ram in (64, 128):
        ch = choose(get_preset("18b"), Hardware(**ONE_4090, cpu_mem=ram * GiB))
        assert ch.layout is None and len(ch.tried) == len(candidate_layouts(8, 1))
        assert not any(pl.fits for _, pl in ch.tried)


# --------------------------------------------------------------------------- --fit
@pytest.mark.parametrize("ram", [64, 128])
def test_fit_answer_fits_and_the_next_size_up_does_not(ram):
    cfg, hw = get_preset("4090"), Hardware(**ONE_4090, cpu_mem=ram * GiB)
    results = fit(cfg, hw)
    assert results and results == sorted(results, key=lambda r: -r.params)
    hd = cfg.model.head_dim
    for r in results:
        assert plan(r.choice.layout.apply(r.cfg), hw).fits
        m = r.cfg.model
        assert (m.head_dim, m.top_k, m.expert_type, m.vocab_size) == (hd, cfg.model.top_k, cfg.model.expert_type,
                                                                     cfg.model.vocab_size)
        assert r.n_layers >= family_depth(cfg, r.d_model)
        deeper = scaled(cfg, r.d_model, r.n_layers + 1, r.num_experts)
        wider = scaled(cfg, r.d_model + hd, max(r.n_layers, family_depth(cfg, r.d_model + hd)), r.num_experts)
        for bigger in (deeper, wider):
            assert choose(bigger, hw).layout is None


def test_fit_grows_with_host_memory():
    cfg = get_preset("4090")
    small, big = (fit(cfg, Hardware(**ONE_4090, cpu_mem=r * GiB))[0].params for r in (64, 128))
    assert big > 1.5 * small


# --------------------------------------------------------------------------- CLI
def test_help_mentions_choose_and_fit():
    text = build_parser().format_help()
    assert "--choose" in text and "--fit" in text


def test_cli_choose_and_fit(capsys):
    assert main(["--preset", "4090", "--choose", "--gpu-mem", "24GB", "--cpu-mem", "64GB"]) == 0
    ch = choose(get_preset("4090"), Hardware(**ONE_4090, cpu_mem=64 * GiB))
    assert f"chosen: {ch.layout.label}" in words(capsys.readouterr().out)
    assert main(["--preset", "4090", "--fit", "--gpu-mem", "24GB", "--cpu-mem", "64GB"]) == 0
    top = fit(get_preset("4090"), Hardware(**ONE_4090, cpu_mem=64 * GiB))[0]
    assert f"--set model.d_model={top.d_model}" in words(capsys.readouterr().out)
    assert main(["--preset", "4090", "--choose", "--zero-stage", "2"]) == 2
    assert "drop --zero-stage" in words(capsys.readouterr().out)
