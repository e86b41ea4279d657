"""The model reproduces the official Moondream2 implementation's outputs."""
from __future__ import annotations

import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file

from conftest import REFERENCE_DIR
from trainer.model.reference_check import REFERENCE_NAME, check


def test_reference_fixture_passes_via_cli():
    run = subprocess.run([sys.executable, "-m", "trainer.model.reference_check", str(REFERENCE_DIR)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "expected.logits_prefix.captcha_200x50" in run.stdout
    assert "expected.image_embeddings.photo_1000x760" in run.stdout
    assert "PASS" in run.stdout


def test_perturbed_reference_fails(tmp_path):
    shutil.copytree(REFERENCE_DIR, tmp_path / "ref")
    path = tmp_path / "ref" / f"{REFERENCE_NAME}.safetensors"
    tensors = load_file(path)
    tensors["expected.image_embeddings.photo_1000x760"][100, 3] += 1e-2
    save_file(tensors, path)
    ok, lines = check(tmp_path / "ref")
    assert not ok
    assert any("photo_1000x760" in line and "FAIL" in line for line in lines)
    assert any("captcha_200x50" in line and "ok" in line for line in lines)


def test_an_expected_tensor_of_unknown_kind_fails_the_check(tmp_path):
    shutil.copytree(REFERENCE_DIR, tmp_path / "ref")
    path = tmp_path / "ref" / f"{REFERENCE_NAME}.safetensors"
    tensors = load_file(path)
    tensors["expected.logits_causal.captcha_200x50"] = tensors["expected.logits_prefix.captcha_200x50"].clone()
    save_file(tensors, path)
    ok, lines = check(tmp_path / "ref")
    assert not ok
    assert "expected.logits_causal.captcha_200x50: not checked (unknown kind)" in lines
