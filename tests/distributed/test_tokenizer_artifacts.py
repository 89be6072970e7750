"""A model trained with a Hugging Face tokenizer folder is self-contained: after the folder is deleted,
its checkpoint consolidates (.pt and --format hf) and moe-generate still runs on both."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moe_dist import load_model_for_inference
from moe_dist.export.consolidate_cli import main as consolidate_main
from moe_dist.data import load_tokenizer
from moe_dist.export.inference import generate_main

from ..tiny_tokenizer import TEXT, save_tiny_bpe
from .trainrun import train

pytestmark = pytest.mark.distributed


def test_trained_with_an_hf_tokenizer_then_its_folder_deleted(tmp_path, capsys):
    tok_dir, out = tmp_path / "tok", tmp_path / "run"
    save_tiny_bpe(tok_dir)
    tok = load_tokenizer(str(tok_dir))
    want_ids = tok.encode(TEXT)
    train(out, 1, "--max-steps", "2", "--tokenizer", str(tok_dir))
    shutil.rmtree(tok_dir)

    ckpt = out / "checkpoints" / "checkpoint_latest"
    spec = json.loads((ckpt / "train_state.json").read_text())["tokenizer"]
    assert spec["type"] == "hf" and spec["path"] == str(tok_dir) and "tokenizer.json" in spec["files"]
    pt, hf = tmp_path / "model.pt", tmp_path / "hf"
    assert consolidate_main([str(ckpt), "-o", str(pt), "-q"]) == 0, capsys.readouterr().err
    assert consolidate_main([str(ckpt), "--format", "hf", "-o", str(hf), "-q"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    texts = set()
    for source in (ckpt, pt):
        rc = generate_main([str(source), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "8"])
        cap = capsys.readouterr()
        assert rc == 0 and cap.out.startswith("def "), cap.err
        texts.add(cap.out)
    assert len(texts) == 1  # the same greedy text from the checkpoint and from its .pt

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(hf))
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == want_ids and hf_tok.eos_token_id == tok.eos_id
    model, _, _ = load_model_for_inference(str(pt))
    hf_model, info = AutoModelForCausalLM.from_pretrained(str(hf), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([want_ids[:32]], device="cpu")
    with torch.no_grad():
        diff = (model(ids, return_aux_loss=False)[0] - hf_model.eval()(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
