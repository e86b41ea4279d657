"""A checkpoint's tokenizer is found as the official code of its revision found it, and the choice is recorded.

No network: tokenizers are trained here with the `tokenizers` library, and "the hub" is a cache directory laid out
as huggingface_hub lays it out, read in offline mode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fake_hub_cache, write_bpe_model
from trainer.model.loading import load_model, model_text, save_model
from trainer.model.synth_tokenizer import write_bpe_tokenizer
from trainer.model.tokenizer_source import REVISION_RULES, rule_for
from trainer.model.layouts import CheckpointError


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline: what this machine (and a cluster without internet) sees."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("revision, repo, repo_revision, template", [
    ("2024-03-13", None, None, "moondream2-legacy"),
    ("2024-08-26", None, None, "moondream2-legacy"),
    ("2025-01-09", "vikhyatk/moondream2", "2024-08-26", "moondream2-2025"),
    ("2025-03-27", "vikhyatk/moondream2", "2024-08-26", "moondream2-2025"),
    ("2025-04-14", "vikhyatk/moondream2", "2025-01-09", "moondream2-2025"),
    ("2025-06-21", "moondream/starmie-v1", None, "moondream2-starmie"),
    ("2025-09-01", "moondream/starmie-v1", None, "moondream2-starmie"),
    (None, "vikhyatk/moondream2", "2024-08-26", "moondream2-2025"),
    ("main", "vikhyatk/moondream2", "2024-08-26", "moondream2-2025"),
])
def test_the_revision_table(revision, repo, repo_revision, template):
    rule = rule_for(revision)
    assert (rule.repo, rule.repo_revision, rule.template) == (repo, repo_revision, template)
    assert [r.since for r in REVISION_RULES] == sorted(r.since for r in REVISION_RULES)


def test_a_2025_01_09_checkpoint_without_tokenizer_takes_the_2024_08_26_one_from_the_hub_cache(tmp_path, offline_hub):
    model = write_bpe_model(tmp_path / "md2")
    tokenizer = write_bpe_tokenizer(tmp_path / "tok")
    fake_hub_cache(offline_hub, "vikhyatk/moondream2", "2024-08-26", {"tokenizer.json": tokenizer})
    loaded = load_model(str(model), revision="2025-01-09")
    choice = loaded.tokenizer_choice
    assert choice.source == "vikhyatk/moondream2@2024-08-26"
    assert choice.bos_id == choice.eos_id == loaded.tokenizer.eos_id == 0  # <|endoftext|> of the trained tokenizer
    assert choice.template == "moondream2-2025" and choice.path.read_bytes() == tokenizer.read_bytes()
    # the model keeps its tokenizer when saved: the file, and the choice inside its config
    save_model(loaded, tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    again = load_model(str(tmp_path / "saved"))
    assert again.tokenizer_choice.as_record() == choice.as_record()


def test_offline_without_the_tokenizer_is_one_line_naming_what_to_download_and_where(tmp_path, offline_hub):
    model = write_bpe_model(tmp_path / "md2")
    with pytest.raises(CheckpointError) as caught:
        load_model(str(model), revision="2025-04-14")
    message = str(caught.value)
    assert "\n" not in message
    assert "vikhyatk/moondream2@2025-01-09 could not be fetched" in message
    assert f"huggingface-cli download vikhyatk/moondream2 tokenizer.json --revision 2025-01-09 --local-dir {model}" \
        in message
    # a 2024 revision ships its own: a missing one means an incomplete download
    with pytest.raises(CheckpointError, match=r"no tokenizer.json; revision 2024-08-26 ships its own"):
        load_model(str(model), revision="2024-08-26")


def test_a_starmie_revision_uses_starmie_ids_and_template_not_the_stale_files_beside_it(tmp_path, offline_hub):
    model = write_bpe_model(tmp_path / "md2")
    write_bpe_tokenizer(model)  # the GPT-2 style files the 2025-06-21 repository still ships
    # id 0 is not <|endoftext|> here: the rule's fixed id 0 must be what is used, not the token's name
    starmie = write_bpe_tokenizer(tmp_path / "starmie", extra_special=("<|b|>", "<|c|>"), first_special=("<|a|>",))
    fake_hub_cache(offline_hub, "moondream/starmie-v1", "main", {"tokenizer.json": starmie})
    loaded = load_model(str(model), revision="2025-06-21")
    assert loaded.tokenizer_choice.source == "moondream/starmie-v1@main"
    assert loaded.tokenizer.bos_id == loaded.tokenizer.eos_id == loaded.tokenizer_choice.bos_id == 0
    assert json.loads(starmie.read_text())["model"]["vocab"]["<|endoftext|>"] == 1
    template = loaded.template(None)
    prompt = template.prompt_ids(loaded.tokenizer, "What?")
    assert prompt[:3] == [1, 15381, 2] and prompt[-1] == 3
    assert template.answer_ids(loaded.tokenizer, "12")[-1] == 0


def test_a_tokenizer_beside_the_weights_wins_and_a_spec_overrides_it(tmp_path, offline_hub):
    model = write_bpe_model(tmp_path / "md2")
    write_bpe_tokenizer(model)
    assert load_model(str(model), revision="2025-01-09").tokenizer_choice.source == str(model / "tokenizer.json")
    other = write_bpe_tokenizer(tmp_path / "other")
    assert load_model(str(model), tokenizer=str(other.parent)).tokenizer_choice.source == str(other)
    fake_hub_cache(offline_hub, "someone/tok", "v2", {"tokenizer.json": other})
    assert load_model(str(model), tokenizer="someone/tok@v2").tokenizer_choice.source == "someone/tok@v2"
    with pytest.raises(CheckpointError, match=r"tokenizer .*/nothing: no tokenizer.json in"):
        load_model(str(model), tokenizer=str(tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub id"):
        load_model(str(model), tokenizer="not a spec")


@pytest.mark.slow
def test_train_records_the_tokenizer_in_its_result_and_saved_model(tmp_path, offline_hub, captcha_parquet):
    """Through the CLI, as a user runs it: the choice is in result.json, and the saved model carries the file."""
    model = write_bpe_model(tmp_path / "md2")
    tokenizer = write_bpe_tokenizer(tmp_path / "tok")
    fake_hub_cache(offline_hub, "vikhyatk/moondream2", "2024-08-26", {"tokenizer.json": tokenizer})
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", "--model", str(model), "--revision",
                           "2025-01-09", "--train-data", str(captcha_parquet), "--max-steps", "1", "--batch-size",
                           "4", "--max-val-samples", "4", "--out", str(out), "--save-model", str(out / "model")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["tokenizer"] == {"tokenizer_source": "vikhyatk/moondream2@2024-08-26", "tokenizer_bos_id": 0,
                                   "tokenizer_eos_id": 0, "tokenizer_template": "moondream2-2025"}
    assert (out / "model" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()


def test_a_tokenizer_with_more_ids_than_the_model_has_rows_is_refused_before_any_embedding(tmp_path, offline_hub):
    model = write_bpe_model(tmp_path / "md2", vocab_size=128)
    tokenizer = write_bpe_tokenizer(model)
    with pytest.raises(CheckpointError, match=rf"tokenizer {tokenizer}: 300 ids, but the model's vocabulary has "
                                              r"128 rows"):
        load_model(str(model))


def test_a_revision_that_is_no_date_is_refused(tmp_path, offline_hub):
    model = write_bpe_model(tmp_path / "md2")
    write_bpe_tokenizer(model)
    with pytest.raises(CheckpointError, match=r"revision 2024-13-99: not a date; a dated revision is YYYY-MM-DD"):
        model_text(str(model), revision="2024-13-99")
    with pytest.raises(CheckpointError, match=r"revision 2024-13-99: not a date"):
        model_text("tiny", revision="2024-13-99")


def test_a_tokenizer_spec_overrides_the_built_in_character_tokenizer_too(tmp_path, offline_hub):
    """docs/models.md: the tokenizer setting overrides everything, so a character-tokenizer model or preset reads
    it too (and one whose vocabulary it does not fit is refused) rather than ignoring it."""
    tokenizer = write_bpe_tokenizer(tmp_path / "tok")
    real_size = model_text("moondream2", tokenizer=str(tokenizer.parent))
    assert real_size.choice.source == str(tokenizer) and real_size.config.tokenizer == "bpe"
    with pytest.raises(CheckpointError, match=r"300 ids, but the model's vocabulary has 128 rows"):
        model_text("tiny", tokenizer=str(tokenizer.parent))
    with pytest.raises(CheckpointError, match=r"tokenizer /nonexistent: no tokenizer.json in /nonexistent"):
        model_text("tiny-reader-v2", tokenizer="/nonexistent")
