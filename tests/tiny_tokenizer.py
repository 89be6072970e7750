"""A tiny Hugging Face tokenizer made offline: a byte-level BPE trained on a few KB of Python."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = "def parse(line):\n    return [w.strip() for w in line.split(',')]  # héllo wörld 日本\n"


def save_tiny_bpe(path: Path, vocab: int = 300) -> None:
    """Train it on the first 6 KB of the standard library's json/__init__.py and TEXT, and save it with
    ``PreTrainedTokenizerFast.save_pretrained`` (tokenizer.json, tokenizer_config.json; EOS ``<|eos|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(json.__file__).read_text()[:6000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus, TEXT], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>").save_pretrained(str(path))
