"""trainer.data.synth and `mdsweep data synth`: deterministic captchas in the Hugging Face layout."""
from __future__ import annotations

import json
import random
import secrets
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import captcha.image as captcha_image
from orchestrator.cli.main import main
from trainer.data.dataset import load_samples
from trainer.data.synth import generate_samples, synthesize


def test_same_seed_same_bytes(tmp_path):
    a = synthesize(12, tmp_path / "a.parquet", seed=7)
    b = synthesize(12, tmp_path / "b.parquet", seed=7)
    assert a.read_bytes() == b.read_bytes()
    rows_a = pq.read_table(a).to_pylist()
    rows_b = pq.read_table(b).to_pylist()
    assert [r["image"]["bytes"] for r in rows_a] == [r["image"]["bytes"] for r in rows_b]


def test_determinism_survives_global_random_state():
    random.seed(1)
    first = list(generate_samples(4, seed=3))
    random.seed(999)
    random.random()
    second = list(generate_samples(4, seed=3))
    assert first == second


def test_different_seeds_differ():
    a = list(generate_samples(5, seed=0))
    b = list(generate_samples(5, seed=1))
    assert [label for label, _ in a] != [label for label, _ in b]
    assert all(pa != pb for (_, pa), (_, pb) in zip(a, b))


def test_prefix_property_and_module_restored():
    short = list(generate_samples(3, seed=5))
    longer = list(generate_samples(6, seed=5))
    assert longer[:3] == short
    # the package's own randomness source is put back afterwards
    assert captcha_image.secrets is secrets


def test_workers_give_identical_output(tmp_path):
    serial = synthesize(70, tmp_path / "serial.parquet", seed=2, length=4)
    parallel = synthesize(70, tmp_path / "parallel.parquet", seed=2, length=4, workers=2)
    assert serial.read_bytes() == parallel.read_bytes()


def test_round_trip_through_load_samples(tmp_path):
    out = synthesize(10, tmp_path / "sub" / "caps.parquet", seed=0, length=5, alphabet="ABC123",
                     width=160, height=60)
    table = pq.read_table(out)
    assert table.column_names == ["image", "solution"]
    assert table.schema.field("image").type.names == ["bytes", "path"]
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"]["_type"] == "Image"
    ds = load_samples(out)
    labels = [s.text for s in ds.samples]
    assert len(labels) == 10 and all(len(t) == 5 and set(t) <= set("ABC123") for t in labels)
    assert labels == table.column("solution").to_pylist()
    assert ds.samples[0].image.size == (160, 60) and ds.samples[0].image.mode == "RGB"
    assert not list((tmp_path / "sub").glob(".*tmp"))  # no temporary file left behind


def test_defaults_are_200x50_six_digits(tmp_path):
    ds = load_samples(synthesize(3, tmp_path / "d.parquet"))
    for s in ds.samples:
        assert s.image.size == (200, 50)
        assert len(s.text) == 6 and s.text.isdigit()


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        synthesize(0, tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="alphabet"):
        synthesize(1, tmp_path / "x.parquet", alphabet="")
    with pytest.raises(ValueError, match="whitespace"):
        synthesize(1, tmp_path / "x.parquet", alphabet="a b")
    with pytest.raises(ValueError, match="font file"):
        synthesize(1, tmp_path / "x.parquet", fonts=[tmp_path / "missing.ttf"])
    assert not (tmp_path / "x.parquet").exists()


DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@pytest.mark.skipif(not DEJAVU.is_file(), reason=f"no font file at {DEJAVU} to draw with")
def test_custom_fonts_draw_the_same_labels_in_another_font(tmp_path):
    """A font that is not one of captcha's own: the same seed gives the same labels, drawn differently."""
    assert str(DEJAVU) not in map(str, captcha_image.DEFAULT_FONTS)
    default = load_samples(synthesize(4, tmp_path / "default.parquet", seed=1)).samples
    custom = load_samples(synthesize(4, tmp_path / "custom.parquet", fonts=[DEJAVU], seed=1)).samples
    assert [s.text for s in custom] == [s.text for s in default]
    assert all(c.image.size == d.image.size == (200, 50) for c, d in zip(custom, default))
    assert all(c.image.tobytes() != d.image.tobytes() for c, d in zip(custom, default))


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "X.parquet"
    rc = main(["data", "synth", "--n", "20", "--out", str(out), "--seed", "4"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out)
    ds = load_samples(out)
    assert len(ds.samples) == 20
    same = tmp_path / "Y.parquet"
    assert main(["data", "synth", "--n", "20", "--out", str(same), "--seed", "4", "--quiet"]) == 0
    assert out.read_bytes() == same.read_bytes()


def test_cli_synth_rejects_bad_options(tmp_path, capsys):
    rc = main(["data", "synth", "--n", "0", "--out", str(tmp_path / "z.parquet")])
    assert rc == 2 and "n must be at least 1" in capsys.readouterr().err


def test_cli_check(tmp_path, capsys):
    out = synthesize(5, tmp_path / "c.parquet", seed=0)
    assert main(["data", "check", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "samples:  5" in printed and "200x50" in printed
    assert main(["data", "check", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_data_check_refuses_labels_the_models_tokenizer_cannot_write_or_fit(tmp_path, capsys):
    """As `train` does: a character the tokenizer lacks, or a label longer than the context leaves room for."""
    from PIL import Image

    folder = tmp_path / "labels"
    folder.mkdir()
    for label in ("日本", "123", "9" * 200):  # the tiny model leaves about 160 tokens for an answer
        Image.new("RGB", (200, 50), (255, 255, 255)).save(folder / f"{label}.png")
    assert main(["data", "check", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 such label(s) for model tiny; --skip-bad drops and counts them" in err[0]
    assert main(["data", "check", str(folder), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "samples:  1" in out and "skipped:  2" in out
    assert "label '日本' cannot be encoded" in out and "the context leaves room for" in out
