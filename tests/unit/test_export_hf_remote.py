"""moe-consolidate --format hf of a model no transformers class computes (the seed's architecture, a
shared expert, SiLU experts): the export ships ``modeling_moe_dist.py`` (``auto_map``) and
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` gives our logits within 1e-4;
a SwiGLU model still exports as plain Mixtral (``test_export_hf.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from moe_dist.config import SEED_MODEL_OPTIONS
from moe_dist.export.consolidate_cli import main
from moe_dist.model import MoETransformer

from ..seed_fixture import make_seed_checkpoint
from ..seed_reference import seed_forward
from .test_consolidate import make_checkpoint
from .test_export_hf import BASE, TOL, _rough_init

CASES = {
    "seed": dict(BASE, top_k=2, **SEED_MODEL_OPTIONS),
    "silu-shared-gqa-untied": dict(BASE, top_k=2, expert_type="silu_mlp", shared_expert=True, n_kv_heads=2,
                                   tie_embeddings=False),
    "swiglu-fused-interleaved": dict(BASE, top_k=1, fused_qkv=True, rope_layout="interleaved"),
}


def _from_pretrained(dest):
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(str(dest), trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_remote_code_export_matches_our_logits(tmp_path, case):
    kw = CASES[case]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MoETransformer, "reset_parameters", _rough_init)
        model, folder = make_checkpoint(tmp_path, kw)
    dest = tmp_path / "hf"
    assert main([str(folder), "--format", "hf", "-o", str(dest), "--verify", "-q"]) == 0
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_moe_dist.MoEDistForCausalLM"
    assert (dest / "modeling_moe_dist.py").is_file()
    hf = _from_pretrained(dest)
    assert type(hf).__name__ == "MoEDistForCausalLM"
    if kw.get("tie_embeddings", True):
        assert hf.lm_head.weight.data_ptr() == hf.model.embed.weight.data_ptr()
    tokens = torch.randint(0, kw["vocab_size"], (3, kw["max_seq_len"]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, _ = model.eval()(tokens, return_aux_loss=False)
        theirs = hf(tokens).logits
    diff = float((ours - theirs).abs().max())
    print(f"{case}: max |logit difference| HF remote code vs ours = {diff:.3g}")
    assert diff < TOL and ours.std() > 1.0
    with torch.no_grad():
        out = hf.generate(tokens[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_seed_checkpoint_exports_to_hf(tmp_path):
    src = tmp_path / "checkpoint_step_60.pt"
    written = make_seed_checkpoint(src)
    dest = tmp_path / "hf"
    # The seed's files do not say which tokenizer it used: --tokenizer names it (here the byte one).
    assert main([str(src), "--format", "hf", "-o", str(dest), "-q", "--tokenizer", "byte"]) == 0
    hf = _from_pretrained(dest)
    tokens = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert float((theirs - seed_forward(written["model"], 4, 2, tokens)).abs().max()) < 1e-5


def test_init_from_a_remote_code_export(tmp_path):
    from moe_dist import model as lm
    from moe_dist.config import ModelConfig
    from moe_dist.run import init_from

    kw = CASES["seed"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MoETransformer, "reset_parameters", _rough_init)
        model, folder = make_checkpoint(tmp_path, kw)
    dest = tmp_path / "hf"
    assert main([str(folder), "--format", "hf", "-o", str(dest), "-q"]) == 0
    cfg = ModelConfig(**kw)
    init_from.check(str(dest), cfg)
    fresh = lm.build(cfg)
    init_from.load(str(dest), fresh)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(Exception, match="model.d_ff"):
        init_from.check(str(dest), ModelConfig(**{**kw, "d_ff": 64}))
