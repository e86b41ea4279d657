"""Shared test helpers: tiny models and synthetic captcha data made on the fly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_DIR = FIXTURES / "moondream2-tiny"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def captcha_parquet(tmp_path_factory) -> Path:
    """96 four-digit captchas, enough for a short job with a validation split."""
    from trainer.data.synth import synthesize

    return synthesize(96, tmp_path_factory.mktemp("captchas") / "train.parquet", length=4, seed=0)


@pytest.fixture(scope="session")
def captcha_test_parquet(tmp_path_factory) -> Path:
    """24 held-out captchas from another seed, for --test-data."""
    from trainer.data.synth import synthesize

    return synthesize(24, tmp_path_factory.mktemp("captchas-test") / "test.parquet", length=4, seed=7)


@pytest.fixture(scope="session", autouse=True)
def crop_cache_dir(tmp_path_factory) -> Path:
    """Every test's preprocessing cache (and that of the Ray workers it starts, which inherit the environment) in
    one session directory, never the user's ~/.cache."""
    import os

    from trainer.data.crop_cache import CACHE_DIR_ENV

    path = tmp_path_factory.mktemp("crop-cache")
    os.environ[CACHE_DIR_ENV] = str(path)
    return path


def write_bpe_model(directory: Path, seed: int = 0, vocab_size: int = 320) -> Path:
    """A `tiny`-sized checkpoint with a BPE vocabulary and no tokenizer beside it, as a 2025 revision comes. The
    synthetic tokenizer has about 300 ids: a `vocab_size` below that makes a model its ids do not fit."""
    import dataclasses

    from trainer.model.config import PRESETS
    from trainer.model.network import MoondreamModel
    from trainer.model.config import WEIGHTS_FILE
    from trainer.model.weights import save_official_weights

    tiny = PRESETS["tiny"]
    config = dataclasses.replace(tiny, tokenizer="bpe", text=dataclasses.replace(tiny.text, vocab_size=vocab_size))
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    save_official_weights(MoondreamModel(config, bos_id=0), directory / WEIGHTS_FILE)
    config.save(directory)
    return directory


def fake_hub_cache(cache: Path, repo: str, revision: str, files: dict[str, Path]) -> None:
    """Lay `files` out as huggingface_hub caches `repo` at `revision` (refs/REVISION → snapshots/COMMIT/...)."""
    import hashlib
    import shutil

    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
