"""Tokenizers and prompt templates.

The real model uses the BPE tokenizer shipped as `tokenizer.json` in its directory.
Small configs trained from scratch use a character tokenizer, so a captcha answer
is one token per character and nothing has to be downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    """The model's own `tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HfTokenizer

        self._tok = HfTokenizer.from_file(str(path))
        eos = self._tok.token_to_id(END_OF_TEXT)
        if eos is None:
            raise ValueError(f"{path}: no {END_OF_TEXT} token, which Moondream2 uses as BOS and EOS")
        self.bos_id = self.eos_id = eos
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(kind: str, model_dir: Path | None) -> Tokenizer:
    if kind == "char":
        return CharTokenizer()
    if model_dir is None or not (Path(model_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"the BPE tokenizer needs {Path(model_dir or '.') / 'tokenizer.json'}")
    return BpeTokenizer(Path(model_dir) / "tokenizer.json")


@dataclass(frozen=True)
class PromptTemplate:
    """A question/answer layout as text pieces, each encoded separately.

    Encoding the pieces apart reproduces the token boundaries of the official code,
    which stores the 2025 prefix and suffix as fixed token ids.
    """

    prefix: str
    question_format: str
    suffix: str
    answer_format: str = " {a}"

    def prompt_ids(self, tokenizer: Tokenizer, question: str) -> list[int]:
        return (tokenizer.encode(self.prefix) + tokenizer.encode(self.question_format.format(q=question))
                + tokenizer.encode(self.suffix))

    def answer_ids(self, tokenizer: Tokenizer, answer: str) -> list[int]:
        return tokenizer.encode(self.answer_format.format(a=answer)) + [tokenizer.eos_id]


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    # 2025 checkpoints: fixed "\n\nQuestion:" / "\n\nAnswer:" ids around " " + question
    "moondream2-2025": PromptTemplate(prefix="\n\nQuestion:", question_format=" {q}", suffix="\n\nAnswer:"),
    # older checkpoints: the whole prompt is one string
    "moondream2-legacy": PromptTemplate(prefix="", question_format="\n\nQuestion: {q}\n\nAnswer:", suffix=""),
}


def get_template(name: str) -> PromptTemplate:
    try:
        return PROMPT_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; choose from {sorted(PROMPT_TEMPLATES)}") from None
