"""The preprocessing cache: same batches, losses and predictions as encoding in memory; one build shared by
processes that start together; an entry named by what it holds; a cut, altered or stale entry is never trusted;
the cache directory deleted is rebuilt the same."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import mdsweep_here
from trainer.data.batching import encode_samples
from trainer.model.config import PRESETS
from trainer.data.crop_cache import ReadOptions, entry_key, open_cached
from trainer.data.crop_store import CROPS_FILE, INDEX_FILE, META_FILE, CacheEntryInvalid, CropStore
from trainer.data.dataset import DataError, load_samples, split_samples
from trainer.evaluation.evaluate import evaluate
from trainer.job import run_job
from trainer.job_config import JobConfig
from trainer.job_data import SampleView, micro_batches, open_job_data, prepare_data, tokenised
from trainer.model.image_crops import make_crops
from trainer.model.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
VISION = PRESETS["tiny"].vision

Row = tuple[str, str, np.ndarray, tuple[int, int]]  # sample id, label, uint8 crops, tiling


def built(path: Path, cache: Path, capfd=None, **read):
    store = open_cached(str(path), VISION, ReadOptions(**read), cache)
    messages = capfd.readouterr().err if capfd else ""
    return store, messages


def in_memory(path: Path, **read) -> list[Row]:
    """Every row of `path` loaded and cropped in memory, as before the cache: what an entry must hold, row for
    row. It shares no code with the cache's build but the loaders and make_crops."""
    rows = []
    for sample in load_samples(path, **read).samples:
        crops = make_crops(sample.image, VISION)
        rows.append((sample.sample_id, sample.text, crops.pixels, crops.tiling))
    return rows


def assert_holds(store: CropStore, expected: list[Row]) -> None:
    """The entry's ids, labels, tilings and every crop byte equal `expected`'s; crops read last row first, so a
    read that only works front to back is caught."""
    assert [(s.sample_id, s.text, s.tiling) for s in store.samples] == [(i, t, tiling) for i, t, _, tiling in expected]
    for i in reversed(range(len(expected))):
        assert np.array_equal(store.crops(i), expected[i][2]), f"crops of row {i}"


@pytest.fixture(scope="module")
def captchas(captcha_parquet) -> list[Row]:
    return in_memory(captcha_parquet)


def test_cached_batches_losses_and_predictions_equal_encoding_in_memory(captcha_parquet, tmp_path):
    """The pre-cache path (every sample encoded into memory, as `predict` still does) against the cache."""
    config = JobConfig(train_data=str(captcha_parquet), max_val_samples=12, cache_dir=str(tmp_path))
    torch.manual_seed(0)
    loaded = load_model("tiny")
    data = prepare_data(config, loaded, open_job_data(config))

    train, val = split_samples(load_samples(captcha_parquet).samples, config.val_fraction, config.split_seed)
    template = loaded.template(config.prompt_template)
    in_memory = encode_samples(train, VISION, loaded.tokenizer, template, config.question)
    in_memory_val = encode_samples(val[:12], VISION, loaded.tokenizer, template, config.question)
    assert [s.sample_id for s in data.train] == [s.sample_id for s in in_memory]

    pad = loaded.tokenizer.eos_id
    cached_stream, memory_stream = micro_batches(data.train, 8, 3, 5, pad), micro_batches(in_memory, 8, 3, 5, pad)
    for _ in range(15):  # past an epoch boundary, from a resumed position
        a, b = next(cached_stream), next(memory_stream)
        assert torch.equal(a.crops, b.crops) and torch.equal(a.text_ids, b.text_ids)
        assert torch.equal(a.labels, b.labels) and a.tilings == b.tilings
        with torch.no_grad():
            loss_a = loaded.model.answer_loss(a.crops, a.tilings, a.text_ids, a.labels, "prefix")[0]
            loss_b = loaded.model.answer_loss(b.crops, b.tilings, b.text_ids, b.labels, "prefix")[0]
        assert float(loss_a) == float(loss_b)

    args = dict(batch_size=4, max_new_tokens=5, device=torch.device("cpu"), autocast_dtype=None)
    cached_metrics, cached_predictions = evaluate(loaded.model, data.val, loaded.tokenizer, "prefix", **args)
    memory_metrics, memory_predictions = evaluate(loaded.model, in_memory_val, loaded.tokenizer, "prefix", **args)
    assert cached_predictions == memory_predictions and cached_metrics == memory_metrics


def test_a_job_reusing_the_cache_matches_the_job_that_built_it(captcha_parquet, tmp_path, capfd):
    config = JobConfig(train_data=str(captcha_parquet), max_steps=6, eval_every=3, batch_size=4,
                       max_val_samples=8, max_new_tokens=5, lr=3e-3, cache_dir=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        losses: list[float] = []
        result = run_job(config, on_step=lambda m: losses.append(m["train_loss"]))
        runs.append((losses, result.predictions, result.final_metrics["val_exact_match"], capfd.readouterr().err))
    (first_losses, first_predictions, first_em, first_err), (losses, predictions, em, err) = runs
    assert "preparing" in first_err and "preparing" not in err  # built once, then read
    assert losses == first_losses and predictions == first_predictions and em == first_em
    assert first_losses[-1] < first_losses[0]


def test_a_truncated_crops_file_is_rebuilt_not_trusted(captcha_parquet, captchas, tmp_path, capfd):
    store, _ = built(captcha_parquet, tmp_path, capfd)
    crops = store.directory / CROPS_FILE
    with open(crops, "r+b") as f:
        f.truncate(crops.stat().st_size - 1000)
    again, err = built(captcha_parquet, tmp_path, capfd)
    assert "rebuilding" in err and "holds" in err and "preparing" in err
    assert again.directory == store.directory
    assert_holds(again, captchas)


@pytest.mark.parametrize("damage", [INDEX_FILE, META_FILE])
def test_a_cut_index_or_meta_is_rebuilt(captcha_parquet, captchas, tmp_path, capfd, damage):
    store, _ = built(captcha_parquet, tmp_path, capfd)
    path = store.directory / damage
    path.write_bytes(path.read_bytes()[:20])
    again, err = built(captcha_parquet, tmp_path, capfd)
    assert "rebuilding" in err and "preparing" in err
    assert_holds(again, captchas)


def test_an_altered_byte_is_caught_when_read_and_the_entry_rebuilt(captcha_parquet, captchas, tmp_path, capfd):
    store, _ = built(captcha_parquet, tmp_path, capfd)
    with open(store.directory / CROPS_FILE, "r+b") as f:
        f.seek(store.samples[5].offset + 17)
        byte = f.read(1)
        f.seek(store.samples[5].offset + 17)
        f.write(bytes([byte[0] ^ 0xFF]))
    store.crops(4)
    with pytest.raises(CacheEntryInvalid, match=f"sample {store.samples[5].sample_id!r}.*checksum"):
        store.crops(5)
    again, err = built(captcha_parquet, tmp_path, capfd)
    assert "marked corrupt" in err and "preparing" in err
    assert_holds(again, captchas)


def test_changed_data_or_geometry_gets_its_own_entry(tmp_path):
    from trainer.data.synth import synthesize

    data = synthesize(6, tmp_path / "d.parquet", length=3, seed=1)
    first, _ = built(data, tmp_path / "cache")
    synthesize(6, data, length=3, seed=2)  # same file name, other images
    second, _ = built(data, tmp_path / "cache")
    other_geometry = open_cached(str(data), PRESETS["moondream2"].vision, ReadOptions(), tmp_path / "cache")
    assert len({first.directory, second.directory, other_geometry.directory}) == 3
    assert other_geometry.crop_size == 378 and second.crop_size == VISION.crop_size
    assert_holds(second, in_memory(data))  # the new rows, not the entry of the old ones


def two_ways(path: Path) -> Path:
    """Three rows that can be read two ways: images from `image` or `photo`, labels from `solution` or `text`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_data import png_bytes

    pq.write_table(pa.table({
        "image": [{"bytes": png_bytes((40 * i, 0, 0)), "path": f"{i}.png"} for i in range(3)],
        "photo": [{"bytes": png_bytes((0, 40 * i, 200), size=(30, 12)), "path": f"p{i}.png"} for i in range(3)],
        "solution": ["a1", "b2", "c3"], "text": ["x", "y", "z"]}), path)
    return path


@pytest.mark.parametrize("read", [{"text_column": "text"}, {"image_column": "photo"}, {"on_bad_sample": "skip"}],
                         ids=["text-column", "image-column", "on-bad-sample"])
def test_how_the_rows_are_read_is_part_of_the_key(tmp_path, read):
    """Another label or image column is another entry holding that column; so is another on_bad_sample, even for
    rows that read the same either way (docs/data.md: the name hashes the columns and on_bad_sample)."""
    data = two_ways(tmp_path / "d.parquet")
    key = entry_key(str(data), ReadOptions(**read), VISION)
    assert key == entry_key(str(data), ReadOptions(**read), VISION)  # the same inputs, the same name
    assert key != entry_key(str(data), ReadOptions(), VISION)
    default, _ = built(data, tmp_path / "cache")
    other, _ = built(data, tmp_path / "cache", **read)
    assert other.directory.name == key and default.directory != other.directory
    assert_holds(default, in_memory(data))
    assert_holds(other, in_memory(data, **read))


def test_ids_labels_and_image_bytes_are_each_part_of_the_key(tmp_path):
    """Rows that differ in one id, one label or one image's bytes, and in nothing else, get names of their own."""
    from test_data import png_bytes, structs, write_parquet, write_png

    def key(path: Path) -> str:
        return entry_key(str(path), ReadOptions(), VISION)

    keys = {"rows": key(write_parquet(tmp_path / "rows.parquet", structs(3), ["1", "2", "3"])),
            "a label": key(write_parquet(tmp_path / "label.parquet", structs(3), ["1", "7", "3"]))}
    images = structs(3)
    images[1] = {**images[1], "bytes": png_bytes((1, 2, 3))}
    keys["an image"] = key(write_parquet(tmp_path / "image.parquet", images, ["1", "2", "3"]))
    for name in ("11", "22", "33"):  # labels from file names, ids from paths: only 33's id differs
        write_png(tmp_path / "folder" / f"{name}.png")
        write_png(tmp_path / "moved" / ("sub" if name == "33" else "") / f"{name}.png")
    keys["folder"], keys["an id"] = key(tmp_path / "folder"), key(tmp_path / "moved")
    assert [t for _, t, _, _ in in_memory(tmp_path / "folder")] == [t for _, t, _, _ in in_memory(tmp_path / "moved")]
    for changed, same_otherwise in (("a label", "rows"), ("an image", "rows"), ("an id", "folder")):
        assert keys[changed] != keys[same_otherwise], f"rows that differ in {changed} share an entry"


def test_the_same_rows_read_the_same_way_reuse_one_entry(captcha_parquet, tmp_path, capfd):
    """The name is the rows' content, not the file's path: a copy elsewhere reads the entry already made."""
    first, err = built(captcha_parquet, tmp_path / "cache", capfd)
    assert "preparing" in err
    copy = tmp_path / "elsewhere" / "copy.parquet"
    copy.parent.mkdir()
    shutil.copyfile(captcha_parquet, copy)
    for path in (captcha_parquet, copy):
        again, err = built(path, tmp_path / "cache", capfd)
        assert "preparing" not in err and again.directory == first.directory


def test_deleting_the_cache_directory_rebuilds_the_same_crops(captcha_parquet, captchas, tmp_path, capfd):
    """docs/data.md: deleting the cache is always safe. Three jobs: one builds, one reuses, the cache is deleted,
    the third rebuilds the same crops; and a job that opened the entry before the deletion reads on."""
    cache = tmp_path / "cache"
    first, err = built(captcha_parquet, cache, capfd)
    assert "preparing" in err
    reused, err = built(captcha_parquet, cache, capfd)
    assert "preparing" not in err
    shutil.rmtree(cache)
    again, err = built(captcha_parquet, cache, capfd)
    assert "preparing" in err and again.directory == first.directory and again.directory.is_dir()
    assert_holds(again, captchas)
    shutil.rmtree(cache)
    assert_holds(reused, captchas)


def test_bad_rows_skipped_while_building_are_counted_on_every_reuse(tmp_path):
    from test_data import structs, write_parquet

    cells = structs(3)
    cells[1] = {"bytes": b"not an image", "path": None}
    data = tmp_path / "bad.parquet"
    write_parquet(data, cells, ["a", "b", "c"])
    with pytest.raises(DataError, match="row 1"):
        built(data, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]  # nothing half-built
    kept = in_memory(data, on_bad_sample="skip")
    assert [sample_id for sample_id, *_ in kept] == ["0", "2"]
    for _ in range(2):
        store, _ = built(data, tmp_path / "cache", on_bad_sample="skip")
        assert store.meta["skipped"] == 1 and "row 1" in store.meta["skipped_reasons"][0]
        assert_holds(store, kept)


BUILDER = """
import hashlib, json, os, sys, time
from pathlib import Path
from trainer.model.config import PRESETS
from trainer.data.crop_cache import open_cached

data, cache, at_lock = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def say(message):
    print(message, file=sys.stderr, flush=True)
    if message.startswith("waiting for another process") or "cropping every image" in message:
        (at_lock / str(os.getpid())).touch()
    if "cropping every image" in message:  # the builder holds the lock until the other two wait on it
        while len(os.listdir(at_lock)) < 3:
            time.sleep(0.01)

store = open_cached(data, PRESETS["tiny"].vision, cache_dir=cache, say=say)
rows = [[s.sample_id, s.text, list(s.tiling), hashlib.sha256(store.crops(i).tobytes()).hexdigest()]
        for i, s in enumerate(store.samples)]
print(json.dumps({"entry": str(store.directory), "rows": rows}))
"""


def test_processes_starting_together_build_the_entry_once(captcha_parquet, captchas, tmp_path):
    """Three processes open one dataset at once: one crops it, the other two wait on the lock, all three read the
    same complete entry. Made certain, not left to timing: each process marks when it reaches the lock (waiting,
    or holding it to build), and the builder crops only once all three have; so the late ones cannot find the
    entry already made."""
    at_lock = tmp_path / "at-lock"
    at_lock.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(captcha_parquet), str(tmp_path / "cache"),
                               str(at_lock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # a hung builder must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum("cropping every image" in err for _, err in outputs) == 1, outputs
    assert sum("waiting for another process" in err for _, err in outputs) == 2, outputs
    expected = [[sample_id, text, list(tiling), hashlib.sha256(crops.tobytes()).hexdigest()]
                for sample_id, text, crops, tiling in captchas]
    read = [json.loads(out) for out, _ in outputs]
    for each in read:  # one entry, complete, the same as cropping in memory, for all three
        assert each == {"entry": read[0]["entry"], "rows": expected}


def test_data_prepare_builds_then_reuses(captcha_parquet, tmp_path, capsys):
    # the command's entry point in this process (no interpreter and torch to start three times); the cache is a
    # folder on disk, which the second call finds as a second process would
    cmd = ["data", "prepare", str(captcha_parquet), "--model", "tiny", "--cache-dir", str(tmp_path)]
    first = mdsweep_here(capsys, *cmd, cwd=ROOT)
    second = mdsweep_here(capsys, *cmd, cwd=ROOT)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "preparing" in first.stderr and "preparing" not in second.stderr
    assert "96 samples" in second.stdout and str(tmp_path) in second.stdout
    missing = mdsweep_here(capsys, *cmd[:2], str(tmp_path / "nope.parquet"), cwd=ROOT)
    assert missing.returncode == 1 and "nope.parquet: path does not exist" in missing.stderr


def test_a_view_reads_its_rows_as_encoding_in_memory_does(captcha_parquet, tmp_path):
    """A view of some rows, in a split's arbitrary order, indexed out of order: each element equals what
    encode_samples makes of the same sample, and the view holds no crops until indexed."""
    store, _ = built(captcha_parquet, tmp_path)
    torch.manual_seed(0)
    loaded = load_model("tiny")
    config = JobConfig(train_data="x")
    rows = [90, 3, 41, 0, 95, 17]
    view, unusable = tokenised(SampleView(store, rows), config, loaded)
    assert unusable == 0 and len(view) == len(rows)
    assert not any(isinstance(v, np.ndarray) for v in vars(view).values())
    samples = load_samples(captcha_parquet).samples
    expected = encode_samples([samples[row] for row in rows], VISION, loaded.tokenizer,
                              loaded.template(config.prompt_template), config.question)
    assert view.ids() == [e.sample_id for e in expected] and view.texts() == [e.target for e in expected]
    for i in (4, 0, -1, 2, 5, 1, -6, 3):
        got, want = view[i], expected[i]
        assert (got.sample_id, got.target, got.tiling) == (want.sample_id, want.target, want.tiling), i
        assert (got.prompt_ids, got.answer_ids) == (want.prompt_ids, want.answer_ids), i
        assert got.crops.dtype == want.crops.dtype and np.array_equal(got.crops, want.crops), i
    assert [e.sample_id for e in view] == [e.sample_id for e in expected]  # iterating stops at its end
