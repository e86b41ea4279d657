"""A small GPT-2 style BPE tokenizer trained here, for tests and benchmarks that cannot download the real one.

Byte-level, so any text encodes, with `<|endoftext|>` as Moondream2's BOS/EOS; a few
hundred ids, all inside the real vocabulary (51 200), so a real-size model can use it.
"""
from __future__ import annotations

from pathlib import Path

from trainer.model.tokenizer import END_OF_TEXT

CORPUS = ("\n\nQuestion: What does the text say?\n\nAnswer: 1234 5678 90", "captcha digits 0123456789")


def write_bpe_tokenizer(directory: Path, *, vocab_size: int = 300, extra_special: tuple[str, ...] = (),
                        first_special: tuple[str, ...] = ()) -> Path:
    """Train on a few lines and write `directory/tokenizer.json`; returns the file. `first_special` come before
    `<|endoftext|>`, so that it is not id 0: a tokenizer whose BOS/EOS id is fixed (starmie's 0) whatever token
    holds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*first_special, END_OF_TEXT, *extra_special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(CORPUS) * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"
