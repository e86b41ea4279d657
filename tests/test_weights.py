"""Official-layout checkpoints: exact round trips and clear errors for bad files."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REFERENCE_DIR
from trainer.model.config import PRESETS, WEIGHTS_FILE
from trainer.model.loading import load_model, save_model
from trainer.model.layouts import CheckpointError, key_mappings
from trainer.model.weights import load_official_weights, official_to_ours

REFERENCE_WEIGHTS = REFERENCE_DIR / "moondream2_tiny_ref.safetensors"


def _saved_tiny(tmp_path):
    torch.manual_seed(3)
    loaded = load_model("tiny")
    save_model(loaded, tmp_path / "model")
    return loaded, tmp_path / "model"


def test_save_then_load_is_exact(tmp_path):
    original, directory = _saved_tiny(tmp_path)
    reloaded = load_model(str(directory))
    before, after = original.model.state_dict(), reloaded.model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_saved_file_uses_the_official_layout(tmp_path):
    _, directory = _saved_tiny(tmp_path)
    saved = load_file(directory / WEIGHTS_FILE)
    assert "model.text.blocks.0.attn.qkv.weight" in saved
    assert saved["model.vision.patch_emb.weight"].ndim == 2
    assert saved["model.vision.pos_emb"].shape[0] == 1
    assert set(saved) == {m.official for m in key_mappings(PRESETS["tiny"])}


def test_reference_weights_round_trip_to_identical_tensors(tmp_path):
    from trainer.model.config import MoondreamConfig
    from trainer.model.network import MoondreamModel
    from trainer.model.weights import save_official_weights
    import json

    spec = json.loads((REFERENCE_DIR / "moondream2_tiny_ref.json").read_text())
    model = MoondreamModel(MoondreamConfig.from_dict(spec), bos_id=0)
    load_official_weights(model, REFERENCE_WEIGHTS)
    save_official_weights(model, tmp_path / "out.safetensors")
    original = {k: v for k, v in load_file(REFERENCE_WEIGHTS).items() if k.startswith("model.")}
    written = load_file(tmp_path / "out.safetensors")
    assert original.keys() == written.keys()
    for key in original:
        assert torch.equal(original[key], written[key]), key


def _broken(tmp_path, edit):
    _, directory = _saved_tiny(tmp_path)
    tensors = load_file(directory / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_FILE)
    return directory


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.text.blocks.1.mlp.fc2.bias"), r"missing key 'model.text.blocks.1.mlp.fc2.bias'"),
    (lambda t: t.update({"model.text.wte": torch.zeros(5, 3)}), r"'model.text.wte' has shape \(5, 3\)"),
    (lambda t: t.update({"model.text.blocks.9.ln.weight": torch.zeros(3)}),
     r"unexpected key 'model.text.blocks.9.ln.weight'"),
], ids=["missing", "wrong-shape", "unexpected"])
def test_a_broken_checkpoint_names_the_key(tmp_path, edit, message):
    directory = _broken(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(str(directory))


def test_region_head_is_ignored_with_a_note(tmp_path):
    def edit(t):
        t["model.region.coord_encoder.weight"] = torch.zeros(4, 4)
    directory = _broken(tmp_path, edit)
    with pytest.warns(UserWarning, match="region-head"):
        load_model(str(directory))


def test_corrupt_file_and_missing_weights_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="nowhere/x y: no such directory"):  # a path, never a hub lookup
        load_model(str(tmp_path / "nowhere" / "x y"))
    with pytest.raises(CheckpointError, match="neither a preset"):
        load_model("x y")


def test_unreachable_hub_gives_a_clear_error(monkeypatch, tmp_path):
    """Offline for real, network or not: huggingface_hub reads HF_HUB_OFFLINE and its cache path once, when it is
    first imported, so the test sets the values it reads, and any connection attempted fails the test (a connection
    error would otherwise be turned into the very CheckpointError expected here)."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    connections: list[tuple] = []

    def no_connection(self, address, *args):
        connections.append(address)
        raise OSError("the test is offline")

    monkeypatch.setattr(socket.socket, "connect", no_connection)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: connections.append(host) or [])
    with pytest.raises(CheckpointError, match="(?s)could not fetch vikhyatk/moondream2@2025-01-09.*local directory"):
        load_model("vikhyatk/moondream2", revision="2025-01-09")
    assert connections == []


def test_official_conversion_rejects_mismatched_config():
    tensors = load_file(REFERENCE_WEIGHTS)
    with pytest.raises(CheckpointError, match="reference"):
        official_to_ours(tensors, PRESETS["tiny"], "reference")


@pytest.mark.parametrize("name, crop, grid", [("tiny-reader", 112, 8), ("tiny-reader-v2", 168, 12)])
def test_the_shipped_bases_load_by_name_through_the_official_layout(name, crop, grid):
    from trainer.model.loading import SHIPPED_MODELS_DIR, shipped_models

    assert name in shipped_models()
    by_name, by_path = load_model(name), load_model(str(SHIPPED_MODELS_DIR / name))
    assert by_name.source_dir == SHIPPED_MODELS_DIR / name
    assert (by_name.model.config.vision.crop_size, by_name.model.config.vision.grid) == (crop, grid)
    official = load_file(SHIPPED_MODELS_DIR / name / WEIGHTS_FILE)
    assert {k.split(".")[1] for k in official} == {"vision", "text"}  # model.vision.*, model.text.*
    expected = official_to_ours(official, by_name.model.config, name)
    state = by_name.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert all(torch.equal(state[k], v) for k, v in by_path.model.state_dict().items())


def test_an_unknown_model_name_lists_presets_and_shipped_models():
    with pytest.raises(CheckpointError, match=r"shipped model \(tiny-reader, tiny-reader-v2\)"):
        load_model("tiny-readr")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_streaming_writer_is_read_back_exactly_by_safetensors(tmp_path, dtype):
    from trainer.model.weights import write_safetensors

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5), "b": torch.randn(7), "c.x": torch.randn(2, 2, 3)}
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    write_safetensors(tmp_path / "w.safetensors", [(k, v.dtype, tuple(v.shape), lambda v=v: v)
                                                   for k, v in tensors.items()], metadata={"format": "pt"})
    read = load_file(tmp_path / "w.safetensors")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="header says"):
        write_safetensors(tmp_path / "x.safetensors", [("a", torch.float32, (2,), lambda: torch.zeros(3))], {})
    assert not list(tmp_path.glob(".x.safetensors*"))  # nothing half-written left behind


# --- a model directory a user can get wrong: one line naming the file, from the header and config alone --------

def test_an_int8_checkpoint_is_refused_from_its_header_naming_the_dtype(tmp_path):
    directory = _broken(tmp_path, lambda t: t.update({k: v.to(torch.int8) for k, v in t.items()}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' is stored as I8; the loader reads "
                                              r"F32, F16, BF16 or F64 weights"):
        load_model(str(directory))


@pytest.mark.parametrize("text, reason", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"text": {"n_heads": 0}}', r"text.n_heads must be ≥ 1, got 0"),
    ('{"text": {"n_heads": 5}}', r"text.dim 2048 must be a multiple of text.n_heads 5"),
    ('{"vision": [1]}', "vision must be an object"),
    ('{"text": {"dim": "wide"}}', "text.dim must be a whole number, got 'wide'"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, text, reason):
    _, directory = _saved_tiny(tmp_path)
    (directory / "mdsweep_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"^{directory / 'mdsweep_config.json'}: .*{reason}"):
        load_model(str(directory))


def test_without_a_config_the_real_size_is_assumed_and_the_message_says_so(tmp_path):
    _, directory = _saved_tiny(tmp_path)
    (directory / "mdsweep_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no mdsweep_config.json, so the real Moondream2 sizes were assumed, "
                                              r"and .*'model.vision.patch_emb.weight' has shape \(64, 588\), the "
                                              r"model config expects \(1152, 588\)"):
        load_model(str(directory))


def test_predict_reads_every_bad_model_as_one_line(tmp_path, captcha_parquet, capsys):
    """Through the CLI: an int8 file, a bad config, ids past the vocabulary each end in one line, no traceback."""
    from conftest import write_bpe_model
    from orchestrator.cli.main import main
    from trainer.model.synth_tokenizer import write_bpe_tokenizer

    int8 = _broken(tmp_path / "int8", lambda t: t.update({k: v.to(torch.int8) for k, v in t.items()}))
    _, no_heads = _saved_tiny(tmp_path / "heads")
    (no_heads / "mdsweep_config.json").write_text('{"text": {"n_heads": 0}}')
    small_vocab = write_bpe_model(tmp_path / "vocab", vocab_size=128)
    write_bpe_tokenizer(small_vocab)
    for model, says in ((int8, "stored as I8"), (no_heads, "n_heads must be ≥ 1"), (small_vocab, "300 ids")):
        assert main(["predict", "--model", str(model), "--data", str(captcha_parquet), "--show", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
