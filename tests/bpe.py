"""A real byte-level BPE tokenizer, trained offline with ``tokenizers`` on the built-in corpus and
saved as a Hugging Face tokenizer folder (what ``AutoTokenizer.save_pretrained`` writes).

No tokenizer can be downloaded here, so the tests make one: ``make_bpe_tokenizer(folder)`` takes
about a second for the default 512 ids and is deterministic for the same corpus.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def make_bpe_tokenizer(folder: Path, vocab_size: int = 512, corpus_bytes: int = 1_000_000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moe_dist.data.corpus import stdlib_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_documents(corpus_bytes), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(folder))
    return Path(folder)
