"""moe-consolidate --format hf: the folder loads in transformers (MixtralForCausalLM, no custom code, no
weight left at its init) and gives our logits. Models no transformers class computes ship their own
modeling file: ``test_export_hf_remote.py``."""

from __future__ import annotations

import json

import pytest
import torch

from moe_dist.data import ByteTokenizer
from moe_dist.export.consolidate_cli import main
from moe_dist.export.inference import generate
from moe_dist.model import MoETransformer

from .test_consolidate import make_checkpoint

BASE = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, d_ff=48, num_experts=4, max_seq_len=32)
CASES = {
    # untied head, grouped-query attention, top-2, another rope base and eps, sharded with an index
    "untied-gqa-top2-sharded": (dict(BASE, n_kv_heads=2, top_k=2, tie_embeddings=False, rope_theta=500.0,
                                     norm_eps=1e-6), ["--max-shard-size", "30KB"]),
    "tied-top1-one-file": (dict(BASE, top_k=1, tie_embeddings=True), []),
}
TOL = 1e-4  # the bar for fp32


def _rough_init(self: MoETransformer) -> None:
    """Weights far from the default init: norm gains not 1, matrices big enough that a swapped tensor,
    another RoPE layout or another routing rule changes the logits far beyond TOL."""
    for p in self.parameters():
        if p.ndim == 1:
            p.data.copy_(1 + 0.5 * torch.randn(p.shape, device=p.device))
        else:
            p.data.normal_(0.0, 0.25)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{case: (our model, export folder, the CLI's stderr)}."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MoETransformer, "reset_parameters", _rough_init)
        for name, (kw, flags) in CASES.items():
            root = tmp_path_factory.mktemp(name)
            model, folder = make_checkpoint(root, kw)
            dest = root / "hf"
            rc = main([str(folder), "--format", "hf", "-o", str(dest), "--verify", "-q", *flags])
            assert rc == 0
            out[name] = (model, dest)
    return out


def _load(dest):
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(str(dest), output_loading_info=True)
    return hf.eval(), info


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_export_and_matches_our_logits(exported, case):
    from safetensors import safe_open

    model, dest = exported[case]
    kw, flags = CASES[case]
    hf, info = _load(dest)
    # No custom code, and every weight comes from the files: nothing missing (left at init), nothing ignored.
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    assert hf.dtype == torch.float32
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["router_jitter_noise"] == 0.0
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (kw["num_experts"], kw["top_k"])
    assert hf.config.num_key_value_heads == kw.get("n_kv_heads", kw["n_heads"])
    assert hf.config.rope_parameters["rope_theta"] == kw.get("rope_theta", 10000.0)
    assert hf.config.rms_norm_eps == kw.get("norm_eps", 1e-5)
    assert hf.config.tie_word_embeddings == kw["tie_embeddings"]
    sharded = bool(flags)
    assert (dest / "model.safetensors.index.json").is_file() == sharded
    assert (dest / "model.safetensors").is_file() == (not sharded)
    names = set()
    for f in dest.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names.update(h.keys())
    assert ("lm_head.weight" in names) == (not kw["tie_embeddings"])
    if kw["tie_embeddings"]:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    tokens = torch.randint(0, kw["vocab_size"], (3, kw["max_seq_len"]), device="cpu",
                           generator=torch.Generator(device="cpu").manual_seed(3))
    with torch.no_grad():
        ours, _ = model(tokens, return_aux_loss=False)
        theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{case}: max |logit difference| HF vs ours = {diff:.3g} (logits up to {ours.abs().max().item():.3g})")
    assert diff < TOL
    assert ours.std().item() > 1.0  # logits big enough for TOL to mean something

    # Greedy decoding agrees token for token, through generation_config.json's EOS;
    # generation_config.json also keeps it off the ids past the tokenizer's 257, as moe-generate does.
    gen_cfg = json.loads((dest / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == ByteTokenizer.eos_id
    assert gen_cfg["suppress_tokens"] == list(range(ByteTokenizer.vocab_size, kw["vocab_size"]))
    prompt = tokens[0, :8].tolist()
    ids = generate(model, prompt, max_new_tokens=8, temperature=0, eos_id=ByteTokenizer.eos_id,
                   vocab_limit=ByteTokenizer.vocab_size)
    with torch.no_grad():
        out = hf.generate(tokens[:1, :8], max_new_tokens=8, do_sample=False)
    assert ids and out[0, 8:].tolist()[:len(ids)] == ids

    # The comparison is sensitive to the two conventions that differ between MoE codebases: swapping the
    # gate and up halves of one layer's experts, or rotating q/k pairs interleaved instead of by halves,
    # moves the logits far beyond TOL.
    layer = hf.model.layers[0]
    with torch.no_grad():
        gate_up = layer.mlp.experts.gate_up_proj
        saved = gate_up.clone()
        gate_up.copy_(torch.cat(gate_up.chunk(2, dim=1)[::-1], dim=1))
        assert (hf(tokens).logits - ours).abs().max().item() > 100 * TOL
        gate_up.copy_(saved)
        q = layer.self_attn.q_proj.weight
        saved = q.clone()
        d = hf.config.head_dim
        half_to_pairs = torch.arange(d, device="cpu").view(2, d // 2).t().reshape(-1)  # [0, h, 1, h+1, ...]
        q.copy_(q.view(-1, d, q.shape[1])[:, half_to_pairs].reshape(q.shape))
        assert (hf(tokens).logits - ours).abs().max().item() > 100 * TOL
        q.copy_(saved)


def test_byte_tokenizer_export_has_our_ids(exported):
    from transformers import AutoTokenizer

    _, dest = exported["tied-top1-one-file"]
    tok = AutoTokenizer.from_pretrained(str(dest))
    ours = ByteTokenizer()
    text = "héllo wörld — 日本語 🙂\n\tdef f(x):  return x  # <tag> ✓\r\n\x00end"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ours.encode(text)
    assert tok.eos_token_id == ours.eos_id and len(tok) == ours.vocab_size
    assert tok.decode(ids + [ours.eos_id], skip_special_tokens=True) == ours.decode(ids + [ours.eos_id]) == text


def test_force_replaces_only_an_earlier_hf_export(exported, tmp_path, capsys):
    _, dest = exported["tied-top1-one-file"]
    folder = dest.parent / "checkpoints" / "checkpoint_latest"
    rc = main([str(folder), "--format", "hf", "-o", str(dest), "-q"])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert main([str(folder), "--format", "hf", "-o", str(dest), "-q", "--force"]) == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    rc = main([str(folder), "--format", "hf", "-o", str(other), "-q", "--force"])
    assert rc == 2 and "not an earlier --format hf export" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep"
