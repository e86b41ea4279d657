"""Tokenizers and prompt templates.

The real model uses the BPE tokenizer shipped as `tokenizer.json` in its directory.
Small configs trained from scratch use a character tokenizer, so a captcha answer
is one token per character and nothing has to be downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Union

from trainer.model.choices import PromptTemplateName

END_OF_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """Id 0 is end-of-text (also BOS), 1 is newline, then printable ASCII."""

    def __init__(self) -> None:
        self._chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self._ids = {ch: i + 1 for i, ch in enumerate(self._chars)}
        self.bos_id = self.eos_id = 0
        self.vocab_size = len(self._chars) + 1

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} in {text!r} is not in the character tokenizer "
                             "(printable ASCII and newline)") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self._chars[i - 1] for i in ids if 0 < i <= len(self._chars))


class BpeTokenizer:
    """A `tokenizer.json` through the `tokenizers` library. Moondream2 uses one id as BOS and EOS: the
    GPT-2 style tokenizers' <|endoftext|>, or `special_id` where the official config fixes it (0 for
    starmie-v1)."""

    def __init__(self, path: Path, special_id: int | None = None) -> None:
        from tokenizers import Tokenizer as HfTokenizer

        try:
            self._tok = HfTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{path}: not a readable tokenizer.json ({exc})") from None
        eos = special_id if special_id is not None else self._tok.token_to_id(END_OF_TEXT)
        if eos is None:
            raise ValueError(f"{path}: no {END_OF_TEXT} token, which Moondream2 uses as BOS and EOS")
        self.bos_id = self.eos_id = eos
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


Piece = Union[str, tuple[int, ...]]


def _piece_ids(tokenizer: Tokenizer, piece: Piece) -> list[int]:
    return list(piece) if isinstance(piece, tuple) else tokenizer.encode(piece)


@dataclass(frozen=True)
class PromptTemplate:
    """A question/answer layout as pieces, each encoded separately: text, or fixed token ids.

    Encoding the pieces apart reproduces the token boundaries of the official code,
    which stores the 2025 prefix and suffix as fixed token ids (text for the GPT-2 style
    tokenizer; special ids with no text for starmie-v1).
    """

    prefix: Piece
    question_format: str
    suffix: Piece
    answer_format: str = " {a}"

    def prompt_ids(self, tokenizer: Tokenizer, question: str) -> list[int]:
        return (_piece_ids(tokenizer, self.prefix) + tokenizer.encode(self.question_format.format(q=question))
                + _piece_ids(tokenizer, self.suffix))

    def answer_ids(self, tokenizer: Tokenizer, answer: str) -> list[int]:
        return tokenizer.encode(self.answer_format.format(a=answer)) + [tokenizer.eos_id]


# keyed by the contract's names (JobConfig.prompt_template), so the config checks a name without this module
PROMPT_TEMPLATES: dict[PromptTemplateName, PromptTemplate] = {
    # 2025 checkpoints: fixed "\n\nQuestion:" / "\n\nAnswer:" ids around " " + question
    "moondream2-2025": PromptTemplate(prefix="\n\nQuestion:", question_format=" {q}", suffix="\n\nAnswer:"),
    # older checkpoints: the whole prompt is one string
    "moondream2-legacy": PromptTemplate(prefix="", question_format="\n\nQuestion: {q}\n\nAnswer:", suffix=""),
    # 2025-06-21 and later (the starmie-v1 tokenizer): the official config's query ids around the question
    "moondream2-starmie": PromptTemplate(prefix=(1, 15381, 2), question_format="{q}", suffix=(3,),
                                         answer_format="{a}"),
}


def get_template(name: str) -> PromptTemplate:
    try:
        return PROMPT_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; choose from {sorted(PROMPT_TEMPLATES)}") from None
