"""What ``--compile`` sees of one transformer block: dynamo's graphs and breaks (no inductor, seconds).

In bf16 the local MoE path traces as one graph: routing counts are a scatter-add histogram, the
grouped GEMMs take device offsets, and no value crosses to the host. In fp32 each of the block's
three grouped GEMMs runs eagerly (dynamo's shape function of ``_grouped_mm`` takes bf16 only), one
break each, and nothing else breaks."""

from __future__ import annotations

import pytest
import torch

from moe_dist import model as lm
from moe_dist.config import get_preset

torch_dynamo = pytest.importorskip("torch._dynamo")


def _explain(kernel: str, autocast: bool):
    torch.manual_seed(0)
    cfg = get_preset("tiny").model
    m = lm.build(cfg, device=torch.device("cpu"))
    lm.select_expert_kernel(m, kernel, torch.device("cpu"), torch.bfloat16 if autocast else torch.float32)
    x = torch.randn(2, 16, cfg.d_model, device="cpu")
    torch_dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return torch_dynamo.explain(m.layers[0])(x, *m.rope(16, torch.device("cpu")))


def test_bf16_block_is_one_graph():
    out = _explain("grouped", autocast=True)
    assert (out.graph_count, out.graph_break_count) == (1, 0), [b.reason for b in out.break_reasons]


def test_fp32_block_breaks_only_at_the_grouped_gemms():
    out = _explain("grouped", autocast=False)
    reasons = [b.reason for b in out.break_reasons]
    assert out.graph_break_count <= 9 and all("disable" in r or "skipped" in r for r in reasons), reasons


def test_grouped_under_autocast_computes_in_the_autocast_dtype():
    """Autocast has no rule for ``_grouped_mm``: without the cast in ``experts._grouped_mm`` the grouped
    kernel ran in fp32 beside a loop in bf16. Both now round alike: within bf16's resolution."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").model
    m = lm.build(cfg, device=torch.device("cpu"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), device="cpu")
    outs = {}
    for kernel in ("grouped", "loop"):
        lm.select_expert_kernel(m, kernel, torch.device("cpu"), torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[kernel] = m.eval()(tokens, return_aux_loss=False)[0].float()
    rel = float((outs["grouped"] - outs["loop"]).norm() / outs["loop"].norm())
    assert rel < 2 ** -7, rel
