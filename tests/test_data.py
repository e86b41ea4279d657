"""trainer.data.dataset: three formats load, labels come out right, bad input is reported clearly."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainer.data.dataset import DataError, LoadedDataset, Sample, decode_image, load_samples, split_samples

STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


def png_bytes(color=(200, 30, 30), size=(20, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color=(10, 120, 200), size=(20, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color, size))
    return path


def write_parquet(path: Path, images, texts, *, image_name="image", text_name="solution", image_type=STRUCT):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({image_name: pa.array(images, type=image_type), text_name: pa.array(texts, type=pa.string())})
    pq.write_table(table, path)
    return path


def structs(n, start=0):
    return [{"bytes": png_bytes((i * 20 % 256, 0, 0)), "path": f"{i}.png"} for i in range(start, start + n)]


# ----------------------------------------------------------------- formats


def test_parquet_struct_column(tmp_path):
    f = write_parquet(tmp_path / "train.parquet", structs(3), ["123456", "654321", " 000111 "])
    ds = load_samples(f)
    assert isinstance(ds, LoadedDataset)
    assert [s.text for s in ds.samples] == ["123456", "654321", "000111"]
    assert [s.sample_id for s in ds.samples] == ["0", "1", "2"]
    assert ds.skipped == 0 and ds.format == "parquet" and str(f) in ds.source
    img = ds.samples[0].image
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (20, 10)
    assert img.getpixel((0, 0)) == (0, 0, 0)


def test_parquet_binary_column_and_text_fallbacks(tmp_path):
    f = write_parquet(tmp_path / "a.parquet", [png_bytes(), png_bytes()], ["ab", "cd"],
                      image_name="img", text_name="label", image_type=pa.binary())
    ds = load_samples(f)
    assert [s.text for s in ds.samples] == ["ab", "cd"]
    # named columns override the defaults
    table = pa.table({"picture": pa.array(structs(1), type=STRUCT), "text": ["x"], "answer": ["y"]})
    pq.write_table(table, tmp_path / "b.parquet")
    assert load_samples(tmp_path / "b.parquet").samples[0].text == "x"
    ds = load_samples(tmp_path / "b.parquet", text_column="answer", image_column="picture")
    assert ds.samples[0].text == "y"


def test_parquet_text_column_priority(tmp_path):
    table = pa.table({"image": pa.array(structs(1), type=STRUCT), "label": ["L"], "text": ["T"], "solution": ["S"]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert load_samples(tmp_path / "p.parquet").samples[0].text == "S"


def test_parquet_struct_with_path_only(tmp_path):
    write_png(tmp_path / "imgs" / "a.png")
    f = write_parquet(tmp_path / "p.parquet", [{"bytes": None, "path": "imgs/a.png"}], ["abc"])
    assert load_samples(f).samples[0].text == "abc"


def test_parquet_directory_hf_layout(tmp_path):
    root = tmp_path / "repo"
    write_parquet(root / "data" / "train-00000-of-00002.parquet", structs(2), ["a1", "a2"])
    write_parquet(root / "data" / "train-00001-of-00002.parquet", structs(1, 2), ["a3"])
    ds = load_samples(root)
    assert [s.text for s in ds.samples] == ["a1", "a2", "a3"]
    ids = [s.sample_id for s in ds.samples]
    assert ids == ["data/train-00000-of-00002:0", "data/train-00000-of-00002:1", "data/train-00001-of-00002:0"]
    assert "2 files" in ds.source


def test_parquet_directory_with_several_splits_needs_a_choice(tmp_path):
    root = tmp_path / "repo"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", structs(2), ["t1", "t2"])
    write_parquet(root / "data" / "test-00000-of-00001.parquet", structs(1), ["e1"])
    with pytest.raises(DataError, match="several splits"):
        load_samples(root)
    assert [s.text for s in load_samples(root, split="test").samples] == ["e1"]
    with pytest.raises(DataError, match="splits found: test, train"):
        load_samples(root, split="validation")


def test_image_folder_labels_from_file_names(tmp_path):
    root = tmp_path / "caps"
    write_png(root / "2b827.png")
    write_png(root / "a1.jpg")  # PNG content under .jpg: PIL sniffs the format
    write_png(root / "sub" / "2b827.png")  # same label in a sub-folder
    (root / "notes.txt").write_text("ignored")
    write_png(root / ".hidden" / "zzz.png")  # hidden folders ignored
    ds = load_samples(root)
    assert ds.format == "image-folder"
    assert [(s.sample_id, s.text) for s in ds.samples] == [
        ("2b827.png", "2b827"), ("a1.jpg", "a1"), ("sub/2b827.png", "2b827")
    ]
    assert len({s.sample_id for s in ds.samples}) == 3


def test_image_folder_uppercase_extension_and_alpha(tmp_path):
    root = tmp_path / "caps"
    root.mkdir()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(root / "XY9.PNG")
    ds = load_samples(root)
    assert ds.samples[0].text == "XY9"
    assert ds.samples[0].image.getpixel((0, 0)) == (255, 255, 255)  # transparency -> white


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped_white(tmp_path):
    import numpy as np

    root = tmp_path / "caps"
    root.mkdir()
    wide = np.array([[0, 257 * 40, 65535], [257 * 128, 1000, 30000]], dtype=np.uint16)
    Image.fromarray(wide).save(root / "AB1.png")
    with Image.open(root / "AB1.png") as im:
        assert im.mode in ("I;16", "I")  # what Pillow hands over for such a file
    image = load_samples(root).samples[0].image
    assert np.asarray(image)[..., 0].tolist() == [[0, 40, 255], [128, 4, 117]]


def test_jsonl_manifest(tmp_path):
    write_png(tmp_path / "imgs" / "a.png")
    absolute = write_png(tmp_path / "elsewhere" / "b.png")
    lines = [
        json.dumps({"image": "imgs/a.png", "text": "hello"}),
        "",
        json.dumps({"image": str(absolute), "text": "world", "extra": 1}),
        json.dumps({"image": "imgs/a.png", "text": "again"}),
    ]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(lines) + "\n")
    ds = load_samples(m)
    assert ds.format == "jsonl"
    assert [s.text for s in ds.samples] == ["hello", "world", "again"]
    assert len({s.sample_id for s in ds.samples}) == 3


def test_csv_manifest_and_directory_holding_it(tmp_path):
    write_png(tmp_path / "x.png")
    write_png(tmp_path / "y.png")
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "text"])
        w.writerow(["x.png", "00x"])
        w.writerow(["y.png", "yy, with comma"])
    ds = load_samples(tmp_path / "labels.csv")
    assert [s.text for s in ds.samples] == ["00x", "yy, with comma"]
    assert ds.format == "csv"
    # a directory with one manifest loads the manifest, not file-name labels
    assert [s.text for s in load_samples(tmp_path).samples] == ["00x", "yy, with comma"]


def test_samples_pickle_and_build_in_memory(tmp_path):
    import pickle

    write_png(tmp_path / "caps" / "abc.png")
    s = load_samples(tmp_path / "caps").samples[0]
    t = pickle.loads(pickle.dumps(s))
    assert t.text == "abc" and t.image.size == (20, 10)
    m = Sample("m", Image.new("L", (4, 4), 7), "txt")
    assert m.image.mode == "RGB" and m.image_bytes is None
    with pytest.raises(TypeError):
        Sample("bad", "not an image", "x")


def test_5000_pngs_load_as_their_encoded_bytes(tmp_path):
    """What keeps loading fast and memory near the files' size: images are kept encoded, decoded when read (timings
    live in bench/data_scale.py, not here)."""
    root = tmp_path / "many"
    root.mkdir()
    data = png_bytes(size=(200, 50))
    for i in range(5000):
        (root / f"{i:05d}.png").write_bytes(data)
    ds = load_samples(root)
    assert len(ds.samples) == 5000
    assert all(s.image_bytes == data for s in ds.samples)
    assert ds.samples[-1].image.size == (200, 50)


# ----------------------------------------------------------------- bad input


def test_corrupt_image_names_file_and_row(tmp_path):
    images = structs(3)
    images[1] = {"bytes": b"\x89PNG\r\n\x1a\n this is not a png", "path": "bad.png"}
    f = write_parquet(tmp_path / "c.parquet", images, ["a", "b", "c"])
    with pytest.raises(DataError) as err:
        load_samples(f)
    msg = str(err.value)
    assert str(f) in msg and "row 1" in msg and "unreadable image" in msg
    ds = load_samples(f, on_bad_sample="skip")
    assert [s.text for s in ds.samples] == ["a", "c"]
    assert ds.skipped == 1 and "row 1" in ds.skipped_reasons[0]


def test_truncated_png_is_caught_at_load(tmp_path):
    good = png_bytes(size=(200, 50), color=(1, 2, 3))
    root = tmp_path / "caps"
    root.mkdir()
    (root / "ok.png").write_bytes(good)
    (root / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cut.png"):
        load_samples(root)
    ds = load_samples(root, on_bad_sample="skip")
    assert [s.text for s in ds.samples] == ["ok"] and ds.skipped == 1


def test_empty_label_names_file_and_row(tmp_path):
    f = write_parquet(tmp_path / "e.parquet", structs(3), ["a", "   ", None])
    with pytest.raises(DataError) as err:
        load_samples(f)
    assert str(f) in str(err.value) and "row 1" in str(err.value) and "empty label" in str(err.value)
    ds = load_samples(f, on_bad_sample="skip")
    assert ds.skipped == 2 and [s.text for s in ds.samples] == ["a"]


def test_manifest_bad_rows(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"garbage")
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join([
        json.dumps({"image": "a.png", "text": "good"}),
        json.dumps({"image": "missing.png", "text": "x"}),
        json.dumps({"image": "broken.png", "text": "y"}),
        json.dumps({"image": "a.png", "text": ""}),
        "{not json",
        json.dumps({"image": "a.png", "text": 12345}),
    ]) + "\n")
    with pytest.raises(DataError) as err:
        load_samples(m)
    assert str(m) in str(err.value) and "row 1 (line 2)" in str(err.value) and "not found" in str(err.value)
    ds = load_samples(m, on_bad_sample="skip")
    assert ds.skipped == 5 and [s.text for s in ds.samples] == ["good"]
    assert any("line 5" in r and "invalid JSON" in r for r in ds.skipped_reasons)


def test_csv_bad_row_names_line(tmp_path):
    write_png(tmp_path / "a.png")
    m = tmp_path / "m.csv"
    m.write_text("image,text\na.png,ok\na.png,\n")
    with pytest.raises(DataError) as err:
        load_samples(m)
    assert str(m) in str(err.value) and "row 1 (line 3)" in str(err.value) and "empty label" in str(err.value)


@pytest.mark.parametrize("on_bad_sample", ["error", "skip"])
def test_missing_column_lists_existing_columns(tmp_path, on_bad_sample):
    f = write_parquet(tmp_path / "m.parquet", structs(1), ["a"], text_name="caption")
    with pytest.raises(DataError) as err:
        load_samples(f, on_bad_sample=on_bad_sample)
    msg = str(err.value)
    assert str(f) in msg and "'caption'" in msg and "'image'" in msg and "'solution'" in msg
    with pytest.raises(DataError, match="no image column 'pic'"):
        load_samples(f, image_column="pic", text_column="caption")
    m = tmp_path / "m.csv"
    m.write_text("path,label\nx.png,a\n")
    with pytest.raises(DataError, match=r"no image column 'image'; columns present: 'path', 'label'"):
        load_samples(m, on_bad_sample=on_bad_sample)


def test_numeric_text_column_is_refused(tmp_path):
    table = pa.table({"image": pa.array(structs(1), type=STRUCT), "label": pa.array([12345], pa.int64())})
    pq.write_table(table, tmp_path / "n.parquet")
    with pytest.raises(DataError, match="leading zeros"):
        load_samples(tmp_path / "n.parquet")


@pytest.mark.parametrize("on_bad_sample", ["error", "skip"])
def test_empty_datasets(tmp_path, on_bad_sample):
    f = write_parquet(tmp_path / "empty.parquet", [], [])
    with pytest.raises(DataError, match="empty dataset"):
        load_samples(f, on_bad_sample=on_bad_sample)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty dataset"):
        load_samples(tmp_path / "e.jsonl", on_bad_sample=on_bad_sample)
    (tmp_path / "e.csv").write_text("image,text\n")
    with pytest.raises(DataError, match="empty dataset"):
        load_samples(tmp_path / "e.csv", on_bad_sample=on_bad_sample)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no dataset found"):
        load_samples(tmp_path / "nothing", on_bad_sample=on_bad_sample)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    f = write_parquet(tmp_path / "bad.parquet", [{"bytes": b"junk", "path": None}] * 2, ["a", "b"])
    with pytest.raises(DataError, match="all 2 row"):
        load_samples(f, on_bad_sample="skip")


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "data.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown dataset format"):
        load_samples(tmp_path / "data.txt")
    with pytest.raises(DataError, match="does not exist"):
        load_samples(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="on_bad_sample"):
        load_samples(tmp_path, on_bad_sample="ignore")


def test_decode_image_rejects_garbage():
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        decode_image(b"nope")
    assert decode_image(png_bytes(mode="L", color=9)).mode == "RGB"


# ----------------------------------------------------------------- split


def _mem_samples(n):
    img = Image.new("RGB", (2, 2))
    return [Sample(str(i), img, f"t{i}") for i in range(n)]


def test_split_is_seeded_and_deterministic():
    samples = _mem_samples(100)
    train, val = split_samples(samples, 0.2, seed=3)
    assert len(train) == 80 and len(val) == 20
    assert {s.sample_id for s in train}.isdisjoint({s.sample_id for s in val})
    again = split_samples(samples, 0.2, seed=3)
    assert [s.sample_id for s in again[1]] == [s.sample_id for s in val]
    other = split_samples(samples, 0.2, seed=4)
    assert [s.sample_id for s in other[1]] != [s.sample_id for s in val]
    # input order is kept within each split
    assert [int(s.sample_id) for s in train] == sorted(int(s.sample_id) for s in train)


def test_empty_split_names_fraction_and_count():
    with pytest.raises(DataError) as err:
        split_samples(_mem_samples(10), 0.01, seed=0)
    assert "0.01" in str(err.value) and "10 sample" in str(err.value) and "validation" in str(err.value)
    with pytest.raises(DataError, match="training"):
        split_samples(_mem_samples(1), 0.9, seed=0)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_samples(_mem_samples(10), 1.0, seed=0)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_samples(_mem_samples(10), 0.0, seed=0)


# ----------------------------------------------------------------- messages a user reads


def test_empty_image_bytes_and_files_are_called_empty_naming_the_row(tmp_path):
    """0-byte image bytes with a path beside them were reported as "image file not found"; a 0-byte file as "not a
    recognised image format"."""
    f = write_parquet(tmp_path / "e.parquet", [structs(1)[0], {"bytes": b"", "path": "nowhere.png"}], ["a", "b"])
    with pytest.raises(DataError, match=rf"^{f} row 1: empty image \(0 bytes\) "):
        load_samples(f)
    (tmp_path / "empty.png").write_bytes(b"")
    write_png(tmp_path / "a.png")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "a.png", "text": "ok"}) + "\n" + json.dumps({"image": "empty.png", "text": "x"}))
    with pytest.raises(DataError, match=rf"^{m} row 1 \(line 2\): empty image file \(0 bytes\): {tmp_path}/empty.png "):
        load_samples(m)


def test_an_unreadable_unlabelled_image_is_named_without_a_buffer_repr(tmp_path):
    """`predict --images` said "cannot identify image file <_io.BytesIO object at 0x...>"."""
    from trainer.data.dataset import load_unlabelled_images

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for name, says in [("empty.png", "empty image (0 bytes)"),
                       ("junk.png", "unreadable image (not a recognised image format)")]:
        with pytest.raises(DataError) as err:
            load_unlabelled_images([tmp_path / name])
        assert str(err.value) == f"{tmp_path / name}: {says}"


def test_a_long_label_is_cut_in_messages():
    """A 5 000-character label was printed whole."""
    from trainer.data.samples import RowCollector, label_in_message

    collector = RowCollector("skip")
    collector.add("s", "m.jsonl row 0", png_bytes(), ["9"] * 5000)  # a JSON list where the label should be
    assert len(collector.reasons[0]) < 120 and "(25000 characters)" in collector.reasons[0]
    assert label_in_message("9" * 5000) == repr("9" * 40) + "… (5000 characters)"
    assert label_in_message("1234") == "'1234'"
