"""The preprocessing cache: same batches, losses and predictions as encoding in memory; one build shared by
processes that start together; a cut, altered or stale entry is never trusted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data.batching import encode_samples
from trainer.model.config import PRESETS
from trainer.data.crop_cache import ReadOptions, open_cached
from trainer.data.crop_store import CROPS_FILE, INDEX_FILE, META_FILE, CacheEntryInvalid
from trainer.data.dataset import DataError, load_samples, split_samples
from trainer.evaluate import evaluate
from trainer.job import run_job
from trainer.job_config import JobConfig
from trainer.job_data import SampleView, micro_batches, open_job_data, prepare_data, tokenised
from trainer.model.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
VISION = PRESETS["tiny"].vision


def built(path: Path, cache: Path, capfd=None, **read):
    store = open_cached(str(path), VISION, ReadOptions(**read), cache)
    messages = capfd.readouterr().err if capfd else ""
    return store, messages


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


def test_a_truncated_crops_file_is_rebuilt_not_trusted(captcha_parquet, tmp_path, capfd):
    store, _ = built(captcha_parquet, tmp_path, capfd)
    reference = [store.crops(i).copy() for i in range(len(store))]
    crops = store.directory / CROPS_FILE
    with open(crops, "r+b") as f:
        f.truncate(crops.stat().st_size - 1000)
    again, err = built(captcha_parquet, tmp_path, capfd)
    assert "rebuilding" in err and "holds" in err and "preparing" in err
    assert again.directory == store.directory
    assert all(np.array_equal(again.crops(i), reference[i]) for i in range(len(again)))


@pytest.mark.parametrize("damage", [INDEX_FILE, META_FILE])
def test_a_cut_index_or_meta_is_rebuilt(captcha_parquet, tmp_path, capfd, damage):
    store, _ = built(captcha_parquet, tmp_path, capfd)
    path = store.directory / damage
    path.write_bytes(path.read_bytes()[:20])
    again, err = built(captcha_parquet, tmp_path, capfd)
    assert "rebuilding" in err and len(again) == len(store)


def test_an_altered_byte_is_caught_when_read_and_the_entry_rebuilt(captcha_parquet, tmp_path, capfd):
    store, _ = built(captcha_parquet, tmp_path, capfd)
    reference = store.crops(5).copy()
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
    assert np.array_equal(again.crops(5), reference)


def test_changed_data_or_geometry_gets_its_own_entry(tmp_path):
    from trainer.data.synth import synthesize

    data = synthesize(6, tmp_path / "d.parquet", length=3, seed=1)
    first, _ = built(data, tmp_path / "cache")
    synthesize(6, data, length=3, seed=2)  # same file name, other images
    second, _ = built(data, tmp_path / "cache")
    other_geometry = open_cached(str(data), PRESETS["moondream2"].vision, ReadOptions(), tmp_path / "cache")
    assert len({first.directory, second.directory, other_geometry.directory}) == 3
    assert other_geometry.crop_size == 378 and second.crop_size == VISION.crop_size


def test_bad_rows_skipped_while_building_are_counted_on_every_reuse(tmp_path):
    from test_data import structs, write_parquet

    cells = structs(3)
    cells[1] = {"bytes": b"not an image", "path": None}
    data = tmp_path / "bad.parquet"
    write_parquet(data, cells, ["a", "b", "c"])
    with pytest.raises(DataError, match="row 1"):
        built(data, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]  # nothing half-built
    for _ in range(2):
        store, _ = built(data, tmp_path / "cache", on_bad_sample="skip")
        assert len(store) == 2 and store.meta["skipped"] == 1 and "row 1" in store.meta["skipped_reasons"][0]


BUILDER = """
import sys, time
from pathlib import Path
from trainer.model.config import PRESETS
from trainer.data.crop_cache import open_cached
while time.time() < float(sys.argv[3]):  # start together
    time.sleep(0.005)
store = open_cached(sys.argv[1], PRESETS["tiny"].vision, cache_dir=Path(sys.argv[2]))
print(store.directory, len(store))
"""


def test_processes_starting_together_build_the_entry_once(captcha_parquet, tmp_path):
    import time

    start = str(time.time() + 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(captcha_parquet), str(tmp_path), start],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum("preparing" in err and "cropping" in err for _, err in outputs) == 1
    assert sum("waiting for another process" in err for _, err in outputs) >= 1
    assert len({out for out, _ in outputs}) == 1  # the same entry, complete, for all three


def test_data_prepare_builds_then_reuses(captcha_parquet, tmp_path):
    cmd = [sys.executable, "-m", "orchestrator.cli", "data", "prepare", str(captcha_parquet), "--model", "tiny",
           "--cache-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "preparing" in first.stderr and "preparing" not in second.stderr
    assert "96 samples" in second.stdout and str(tmp_path) in second.stdout
    missing = subprocess.run([*cmd[:5], str(tmp_path / "nope.parquet")], capture_output=True, text=True, env=env,
                             cwd=str(ROOT), timeout=120)
    assert missing.returncode == 1 and "nope.parquet: path does not exist" in missing.stderr


def test_a_view_holds_no_crops_until_indexed(captcha_parquet, tmp_path):
    store, _ = built(captcha_parquet, tmp_path)
    torch.manual_seed(0)
    loaded = load_model("tiny")
    view, unusable = tokenised(SampleView(store, list(range(len(store)))), JobConfig(train_data="x"), loaded)
    assert unusable == 0 and len(view) == 96
    assert not any(isinstance(v, np.ndarray) for v in vars(view).values())
    assert view[3].crops.shape[1:] == (VISION.crop_size, VISION.crop_size, 3)
