import json
import typing

import pytest

from trainer.model.choices import PromptTemplateName
from trainer.model.tokenizer import PROMPT_TEMPLATES, BpeTokenizer, CharTokenizer, get_template


def test_char_tokenizer_round_trip_and_clear_error():
    tok = CharTokenizer()
    ids = tok.encode("\n\nAnswer: 2b8 7")
    assert tok.decode(ids) == "\n\nAnswer: 2b8 7"
    assert tok.eos_id not in ids
    with pytest.raises(ValueError, match="'é'"):
        tok.encode("café")


def test_every_template_name_the_config_accepts_has_a_template_and_no_other():
    """JobConfig checks `prompt_template` against its own names; the tokenizer must have exactly those."""
    assert list(PROMPT_TEMPLATES) == list(typing.get_args(PromptTemplateName))


def test_the_text_templates_render_the_same_text_and_starmie_uses_its_fixed_ids():
    tok = CharTokenizer()
    texts = {name: tok.decode(PROMPT_TEMPLATES[name].prompt_ids(tok, "What does the text say?"))
             for name in ("moondream2-2025", "moondream2-legacy")}
    assert set(texts.values()) == {"\n\nQuestion: What does the text say?\n\nAnswer:"}
    # the official config's query template for starmie-v1: special ids around the question as is
    starmie = get_template("moondream2-starmie")
    assert starmie.prompt_ids(tok, "12") == [1, 15381, 2, *tok.encode("12"), 3]
    assert starmie.answer_ids(tok, "34") == [*tok.encode("34"), tok.eos_id]
    answer = get_template("moondream2-2025").answer_ids(tok, "1234")
    assert answer[-1] == tok.eos_id and tok.decode(answer) == " 1234"
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("nope")


def test_bpe_tokenizer_reads_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    bpe = BpeTokenizer(tmp_path / "tokenizer.json")
    assert bpe.eos_id == bpe.bos_id == 0
    assert bpe.encode("ab") == [3]
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"] = []
    data["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="endoftext"):
        BpeTokenizer(tmp_path / "tokenizer.json")
