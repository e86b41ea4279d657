"""Checkpoints in every layout the official loader accepts load to the same model as the 2025 layout.

The tests write the layouts themselves from the reference fixture and the shipped base: the 2024 names of the
revisions behind the official captcha fine-tune, the 2025 names without `model.`, `torch.compile`'s `._orig_mod`
infixes, and half-precision files.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REFERENCE_DIR
from harness import mdsweep, mdsweep_here
from trainer.model.config import SHIPPED_MODELS_DIR, WEIGHTS_FILE
from trainer.model.layouts import LAYOUTS, CheckpointError
from trainer.model.loading import load_model
from trainer.model.reference_check import REFERENCE_NAME, check

TINY_READER = SHIPPED_MODELS_DIR / "tiny-reader"
LAYOUT_NAMES = [layout.name for layout in LAYOUTS]


def compiled(name: str) -> str:
    """`name` as a `torch.compile`d module saves it: `._orig_mod` after the first component."""
    head, _, rest = name.partition(".")
    return f"{head}._orig_mod.{rest}"


# The 2024 names written out as the official loader of those revisions reads them (moondream/torch/weights.py),
# so that the tests make 2024 files without the code under test (the renames in LAYOUTS): by module, and the
# parts of a block whose names changed.
MODULES_2024 = {
    "model.vision.patch_emb": "vision_encoder.encoder.model.visual.patch_embed.linear",
    "model.vision.pos_emb": "vision_encoder.encoder.model.visual.pos_embed",
    "model.vision.blocks": "vision_encoder.encoder.model.visual.blocks",
    "model.vision.post_ln": "vision_encoder.encoder.model.visual.norm",
    "model.vision.proj_mlp": "vision_encoder.projection.mlp",
    "model.text.wte": "text_model.transformer.embd.wte.weight",
    "model.text.blocks": "text_model.transformer.h",
    "model.text.post_ln": "text_model.lm_head.ln",
    "model.text.lm_head": "text_model.lm_head.linear",
}
BLOCK_PARTS_2024 = {"vision": {"ln1": "norm1", "ln2": "norm2"},
                    "text": {"attn.qkv": "mixer.Wqkv", "attn.proj": "mixer.out_proj"}}


def name_2024(name: str) -> str:
    """A 2025 tensor name in the 2024 layout, from the tables above."""
    block = re.match(r"^model\.(vision|text)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", name)
    if block:
        tower, index, part, kind = block.groups()
        return f"{MODULES_2024[f'model.{tower}.blocks']}.{index}.{BLOCK_PARTS_2024[tower].get(part, part)}.{kind}"
    if name in MODULES_2024:  # tensors that are a module of their own: pos_emb, wte
        return MODULES_2024[name]
    module = next(m for m in MODULES_2024 if name.startswith(m + "."))
    return MODULES_2024[module] + name[len(module):]


# every layout's names, written by the tests themselves
WRITE_NAME = {"2025": lambda name: name, "2025 without the 'model.' prefix": lambda name: name.removeprefix("model."),
              "2024": name_2024}


def rewrite(tensors: dict[str, torch.Tensor], layout_name: str, *, orig_mod: bool = False,
            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A 2025-layout state dict in another layout; non-weight keys (`expected.*`) kept as they are."""
    out = {}
    for key, tensor in tensors.items():
        if key.startswith("model."):
            key = WRITE_NAME[layout_name](key)
            key = compiled(key) if orig_mod else key
            tensor = tensor.to(dtype) if dtype is not None else tensor
        out[key] = tensor.contiguous()
    return out


def resaved(source: Path, target: Path, weights_name: str, layout_name: str, **kwargs) -> Path:
    shutil.copytree(source, target)
    path = target / weights_name
    save_file(rewrite(load_file(path), layout_name, **kwargs), str(path))
    return target


def test_the_2024_names_are_the_official_loaders():
    """Spot checks against the names the official loader reads (moondream/torch/weights.py)."""
    rename = {lay.name: lay for lay in LAYOUTS}["2024"].rename
    assert rename("model.vision.patch_emb.weight") == "vision_encoder.encoder.model.visual.patch_embed.linear.weight"
    assert rename("model.vision.pos_emb") == "vision_encoder.encoder.model.visual.pos_embed"
    assert rename("model.vision.blocks.3.ln2.bias") == "vision_encoder.encoder.model.visual.blocks.3.norm2.bias"
    assert rename("model.vision.blocks.3.attn.qkv.weight") == \
        "vision_encoder.encoder.model.visual.blocks.3.attn.qkv.weight"
    assert rename("model.vision.post_ln.weight") == "vision_encoder.encoder.model.visual.norm.weight"
    assert rename("model.vision.proj_mlp.fc2.bias") == "vision_encoder.projection.mlp.fc2.bias"
    assert rename("model.text.wte") == "text_model.transformer.embd.wte.weight"
    assert rename("model.text.blocks.11.attn.qkv.bias") == "text_model.transformer.h.11.mixer.Wqkv.bias"
    assert rename("model.text.blocks.0.attn.proj.weight") == "text_model.transformer.h.0.mixer.out_proj.weight"
    assert rename("model.text.blocks.0.mlp.fc1.weight") == "text_model.transformer.h.0.mlp.fc1.weight"
    assert rename("model.text.post_ln.bias") == "text_model.lm_head.ln.bias"
    assert rename("model.text.lm_head.weight") == "text_model.lm_head.linear.weight"
    # and every name of a real checkpoint as the tests write it (the round trips below)
    assert set(WRITE_NAME) == set(LAYOUT_NAMES)
    names = list(load_file(TINY_READER / WEIGHTS_FILE))
    assert [rename(n) for n in names] == [name_2024(n) for n in names]


@pytest.mark.parametrize("orig_mod", [False, True], ids=["plain", "orig_mod"])
@pytest.mark.parametrize("layout_name", LAYOUT_NAMES)
def test_the_reference_fixture_in_every_layout_reproduces_the_official_outputs(tmp_path, layout_name, orig_mod):
    directory = resaved(REFERENCE_DIR, tmp_path / "ref", f"{REFERENCE_NAME}.safetensors", layout_name,
                        orig_mod=orig_mod)
    ok, lines = check(directory)
    assert ok, lines


@pytest.mark.parametrize("orig_mod", [False, True], ids=["plain", "orig_mod"])
@pytest.mark.parametrize("layout_name", LAYOUT_NAMES)
def test_the_shipped_base_in_every_layout_loads_to_identical_weights_and_logits(tmp_path, layout_name, orig_mod):
    original = load_model(str(TINY_READER))
    assert original.layout == "2025"
    loaded = load_model(str(resaved(TINY_READER, tmp_path / "m", WEIGHTS_FILE, layout_name, orig_mod=orig_mod)))
    assert loaded.layout == layout_name
    before, after = original.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _logits(loaded) .equal(_logits(original))


def _logits(loaded) -> torch.Tensor:
    torch.manual_seed(0)
    model = loaded.model.eval()
    crops = torch.rand(2, 3, model.config.vision.crop_size, model.config.vision.crop_size) * 2 - 1
    with torch.no_grad():
        image = model.encode_images(crops, [(1, 1)])[0]
        return model.text_logits(image[None], torch.tensor([[5, 6, 7]]), "prefix")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_their_rounded_values(tmp_path, dtype):
    original = load_model(str(TINY_READER))
    loaded = load_model(str(resaved(TINY_READER, tmp_path / "m", WEIGHTS_FILE, "2024", dtype=dtype)))
    before, after = original.model.state_dict(), loaded.model.state_dict()
    for key in before:
        assert after[key].dtype == torch.float32
        assert torch.equal(after[key], before[key].to(dtype).float()), key


def test_saving_writes_the_2025_layout_whatever_was_read(tmp_path):
    from trainer.model.loading import save_model

    loaded = load_model(str(resaved(TINY_READER, tmp_path / "m", WEIGHTS_FILE, "2024", orig_mod=True)))
    save_model(loaded, tmp_path / "out")
    assert set(load_file(tmp_path / "out" / WEIGHTS_FILE)) == set(load_file(TINY_READER / WEIGHTS_FILE))


def test_a_checkpoint_that_fits_no_layout_names_the_closest_and_its_first_missing_key(tmp_path):
    directory = resaved(TINY_READER, tmp_path / "m", WEIGHTS_FILE, "2024")
    tensors = load_file(directory / WEIGHTS_FILE)
    tensors["text_model.transformer.h.1.mixer.Wqkv"] = tensors.pop("text_model.transformer.h.1.mixer.Wqkv.weight")
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"missing key 'text_model.transformer.h.1.mixer.Wqkv.weight' "
                                              r"\(1 missing; it fits none of the official layouts; closest is the "
                                              r"2024 layout \(\d+ of \d+ keys\)\)"):
        load_model(str(directory))
    save_file({"encoder.weight": torch.zeros(2)}, str(directory / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="it holds no Moondream2 weights"):
        load_model(str(directory))


def test_a_2024_region_head_is_skipped_with_a_note(tmp_path):
    directory = resaved(TINY_READER, tmp_path / "m", WEIGHTS_FILE, "2024")
    tensors = load_file(directory / WEIGHTS_FILE)
    tensors["region_model.coordinate_encoder.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.warns(UserWarning, match=r"ignoring 1 region-head tensors \(region_model\.\*\)"):
        load_model(str(directory))


@pytest.mark.slow
def test_train_and_predict_read_a_2024_checkpoint_as_they_read_the_2025_one(tmp_path, captcha_parquet, capsys):
    """The same training run from the same base in two layouts: equal losses, equal predictions. Each train is
    a process started from another folder (bench/mutations.py X1 relies on it); each predict runs in this one."""
    old = resaved(TINY_READER, tmp_path / "old", WEIGHTS_FILE, "2024", orig_mod=True)
    results = {}
    for name, model in (("2025", str(TINY_READER)), ("2024", str(old))):
        out = tmp_path / f"run-{name}"
        done = mdsweep("train", "--model", model, "--train-data", str(captcha_parquet), "--max-steps", "2",
                        "--batch-size", "4", "--max-val-samples", "8", "--out", str(out),
                        "--save-model", str(out / "model"), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        predicted = mdsweep_here(capsys, "predict", "--model", str(out / "model"), "--data", str(captcha_parquet),
                                 "--limit", "8", "--show", "-1", cwd=tmp_path)
        assert predicted.returncode == 0, predicted.stderr
        result = json.loads((out / "result.json").read_text())
        results[name] = (result["final_metrics"]["train_loss"], predicted.stdout.splitlines()[:8])
    assert results["2024"] == results["2025"]


@pytest.mark.slow
def test_a_sweep_trains_the_2024_layout_as_it_trains_the_2025_one(tmp_path, captcha_parquet):
    """`--cross model=NEW,OLD`: every proposal runs on the base in both layouts, so their rows must match exactly."""
    import pyarrow.parquet as pq

    old = resaved(TINY_READER, tmp_path / "old", WEIGHTS_FILE, "2024", orig_mod=True)
    done = mdsweep("run", "--name", "layouts", "--space", "smoke:paired", "--cross", f"model={TINY_READER},{old}",
                   "--num-samples", "1", "--train-data", str(captcha_parquet), "--max-steps", "2", "--batch-size", "4",
                   "--max-val-samples", "8", "--set", "max_new_tokens=5", "--num-cpus", "2", "--quiet", "--storage",
                   str(tmp_path / "sweeps"), "--results", str(tmp_path / "results"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = {Path(r["model"]).name: r for r in pq.read_table(tmp_path / "results" / "trials").to_pylist()}
    assert set(trials) == {"tiny-reader", "old"} and all(r["outcome"] == "ok" for r in trials.values())
    assert trials["old"]["final_train_loss"] == trials["tiny-reader"]["final_train_loss"]
    predictions = pq.read_table(tmp_path / "results" / "predictions").to_pylist()
    by_trial = {tid: sorted((p["sample_id"], p["prediction"]) for p in predictions if p["trial_id"] == tid)
                for tid in (trials["old"]["trial_id"], trials["tiny-reader"]["trial_id"])}
    assert by_trial[trials["old"]["trial_id"]] == by_trial[trials["tiny-reader"]["trial_id"]]
