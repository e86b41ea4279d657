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
    from trainer.synth import synthesize

    return synthesize(96, tmp_path_factory.mktemp("captchas") / "train.parquet", length=4, seed=0)


@pytest.fixture(scope="session")
def captcha_test_parquet(tmp_path_factory) -> Path:
    """24 held-out captchas from another seed, for --test-data."""
    from trainer.synth import synthesize

    return synthesize(24, tmp_path_factory.mktemp("captchas-test") / "test.parquet", length=4, seed=7)


@pytest.fixture(scope="session", autouse=True)
def crop_cache_dir(tmp_path_factory) -> Path:
    """Every test's preprocessing cache (and that of the Ray workers it starts, which inherit the environment) in
    one session directory, never the user's ~/.cache."""
    import os

    from trainer.crop_cache import CACHE_DIR_ENV

    path = tmp_path_factory.mktemp("crop-cache")
    os.environ[CACHE_DIR_ENV] = str(path)
    return path
