"""Checkpoints and exports carry their tokenizer: a Hugging Face tokenizer's spec embeds its files, so
consolidation and moe-generate work after the tokenizer folder is deleted; --tokenizer overrides it."""

from __future__ import annotations

import json
import shutil

import pytest

from moe_dist.checkpoint import layout
from moe_dist.checkpoint.manifest import write_manifest
from moe_dist.export.consolidate_cli import main as consolidate_main
from moe_dist.data import DataError, load_tokenizer, tokenizer_from_spec
from moe_dist.export.inference import generate, generate_main

from ..tiny_tokenizer import TEXT, save_tiny_bpe
from .test_consolidate import TINY, make_checkpoint


def test_hf_spec_works_after_the_folder_is_deleted(tmp_path):
    save_tiny_bpe(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    spec = json.loads(json.dumps(tok.to_spec()))  # as train_state.json stores it
    assert spec["path"] == str(tmp_path / "tok") and "tokenizer.json" in spec["files"]
    shutil.rmtree(tmp_path / "tok")
    again = tokenizer_from_spec(spec)
    assert again.encode(TEXT) == tok.encode(TEXT) and len(tok.encode(TEXT)) < len(TEXT.encode())  # merges used
    assert (again.vocab_size, again.eos_id) == (tok.vocab_size, tok.eos_id)
    assert again.decode(again.encode(TEXT)) == TEXT
    # A spec without files (a checkpoint written before they were embedded) whose folder is gone.
    old = {k: v for k, v in spec.items() if k != "files"}
    with pytest.raises(DataError, match="--tokenizer"):
        tokenizer_from_spec(old)


@pytest.fixture
def hf_checkpoint(tmp_path):
    """A checkpoint whose train_state.json records an HF tokenizer (embedded files), then the folder is gone."""
    save_tiny_bpe(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    model, folder = make_checkpoint(tmp_path / "run", TINY)
    state = json.loads((folder / layout.TRAIN_STATE).read_text())
    state["tokenizer"] = tok.to_spec()
    (folder / layout.TRAIN_STATE).write_text(json.dumps(state, indent=1))
    write_manifest(folder, {"step": state["step"]})
    shutil.rmtree(tmp_path / "tok")
    return model, folder, tok


def _generate(argv, capsys) -> tuple[int, str, str]:
    rc = generate_main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_consolidate_and_generate_without_the_tokenizer_folder(hf_checkpoint, tmp_path, capsys):
    model, folder, tok = hf_checkpoint
    prompt = "def parse(line):"
    want = prompt + tok.decode(generate(model, tok.encode(prompt), 12, temperature=0, eos_id=tok.eos_id,
                                        vocab_limit=tok.vocab_size)) + "\n"
    pt, st, hf = tmp_path / "m.pt", tmp_path / "st", tmp_path / "hf"
    for fmt, out in (("pt", pt), ("safetensors", st), ("hf", hf)):
        assert consolidate_main([str(folder), "--format", fmt, "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    for source in (folder, pt, st):
        rc, out, err = _generate([str(source), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"],
                                 capsys)
        assert rc == 0, err
        assert out == want, source
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(hf))
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == tok.encode(TEXT)
    assert hf_tok.eos_token_id == tok.eos_id == json.loads((hf / "config.json").read_text())["eos_token_id"]


def test_generate_tokenizer_flag_overrides(hf_checkpoint, tmp_path, capsys):
    model, folder, tok = hf_checkpoint
    args = [str(folder), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0"]
    rc, out, err = _generate(args + ["--tokenizer", "byte"], capsys)
    ids = generate(model, list(b"ab"), 6, temperature=0, eos_id=256, vocab_limit=257)
    assert rc == 0 and out == "ab" + bytes(i for i in ids if i < 256).decode("utf-8", errors="replace") + "\n", err
    rc, out, err = _generate(args + ["--tokenizer", str(tmp_path / "nowhere")], capsys)
    assert rc == 2 and "nowhere" in err and len(err.strip().splitlines()) == 1


def test_hf_export_of_a_checkpoint_without_tokenizer_files_needs_tokenizer_flag(tmp_path, capsys):
    _, folder = make_checkpoint(tmp_path / "run", TINY)
    state = json.loads((folder / layout.TRAIN_STATE).read_text())
    state["tokenizer"] = {"type": "hf", "path": str(tmp_path / "gone"), "vocab_size": 300, "eos_id": 0}
    (folder / layout.TRAIN_STATE).write_text(json.dumps(state, indent=1))
    write_manifest(folder, {"step": state["step"]})
    rc = consolidate_main([str(folder), "--format", "hf", "-o", str(tmp_path / "hf"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "gone" in err and "--tokenizer" in err and not (tmp_path / "hf").exists()
    # the .pt export of the same checkpoint still works: it needs no tokenizer files
    assert consolidate_main([str(folder), "-o", str(tmp_path / "m.pt"), "-q"]) == 0
    # --tokenizer supplies one: here a byte tokenizer, so the hf export gets the byte-level tokenizer
    assert consolidate_main([str(folder), "--format", "hf", "-o", str(tmp_path / "hf"), "-q",
                             "--tokenizer", "byte"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 256 and (tmp_path / "hf" / "tokenizer.json").is_file()
    rc = consolidate_main([str(folder), "-o", str(tmp_path / "n.pt"), "-q", "--tokenizer", str(tmp_path / "gone")])
    assert rc == 2 and "--tokenizer" in capsys.readouterr().err and not (tmp_path / "n.pt").exists()
