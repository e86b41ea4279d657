"""The own captcha renderer (trainer.data.synth.generate_drawn) and the general pretraining mix of
models/make_tiny_reader.py."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from trainer.data.synth import generate_drawn, synthesize

ROOT = Path(__file__).resolve().parents[1]


def load_recipe():
    spec = importlib.util.spec_from_file_location("make_tiny_reader", ROOT / "models" / "make_tiny_reader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drawn_samples_are_seeded_and_independent_of_n():
    three = list(generate_drawn(3, length=5, alphabet="abc123XYZ", width=120, height=40, seed=4))
    second = list(generate_drawn(1, length=5, alphabet="abc123XYZ", width=120, height=40, seed=4, start=1))
    assert second[0] == three[1]
    assert list(generate_drawn(3, length=5, alphabet="abc123XYZ", width=120, height=40, seed=5)) != three
    for label, png in three:
        assert len(label) == 5 and set(label) <= set("abc123XYZ")
        assert Image.open(io.BytesIO(png)).size == (120, 40)


def test_synthesize_writes_the_drawn_renderer_in_the_same_layout(tmp_path):
    out = synthesize(4, tmp_path / "drawn.parquet", length=3, alphabet="xyz", width=90, height=30, seed=1,
                     renderer="drawn")
    rows = pq.read_table(out).to_pylist()
    assert [r["solution"] for r in rows] == [label for label, _ in generate_drawn(
        4, length=3, alphabet="xyz", width=90, height=30, seed=1)]


def test_general_mix_covers_cases_lengths_sizes_and_leaves_the_bench_styles_out():
    recipe = load_recipe()
    files = recipe.general_files(per_length=12_000, seed=0)
    assert {f["length"] for f in files} == set(range(3, 9))
    assert {f["renderer"] for f in files} == {"captcha", "drawn"}
    assert (200, 50) in {(f["width"], f["height"]) for f in files}
    used = set("".join(f["alphabet"] for f in files))
    assert {"a", "z", "A", "Z", "0", "9"} <= used
    fonts = {str(p).lower() for f in files for p in (f["fonts"] or [])}
    assert fonts and not any(word in p for p in fonts for word in ("comic", "carlito", "caladea", "freefont"))
    assert len({f["name"] for f in files}) == len(files) and len({f["seed"] for f in files}) == len(files)
