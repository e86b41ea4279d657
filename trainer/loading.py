"""Resolve a model spec (preset name, local directory, hub id) to a model and its tokenizer."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer.attention import AttentionBackend
from trainer.config import CONFIG_FILE, PRESETS, SHIPPED_MODELS_DIR, MoondreamConfig, shipped_models
from trainer.model import MoondreamModel
from trainer.tokenizer import Tokenizer, load_tokenizer
from trainer.weights import HUB_ID, WEIGHTS_FILE, CheckpointError, fetch_from_hub, load_official_weights, \
    read_safetensors, save_official_weights



@dataclass
class LoadedModel:
    model: MoondreamModel
    tokenizer: Tokenizer
    source_dir: Optional[Path]  # where weights and tokenizer came from; None for a fresh preset


def load_model(spec: str, *, revision: Optional[str] = None,
               attention_backend: AttentionBackend = "sdpa") -> LoadedModel:
    """A preset name gives fresh random weights (seed torch first); a shipped model's name, a directory or a
    hub id loads weights."""
    if spec in PRESETS:
        config = PRESETS[spec]
        tokenizer = load_tokenizer(config.tokenizer, None)
        return LoadedModel(MoondreamModel(config, bos_id=tokenizer.bos_id, attention_backend=attention_backend),
                           tokenizer, None)
    directory = Path(spec).expanduser()
    if spec in shipped_models():
        directory = SHIPPED_MODELS_DIR / spec
    elif not directory.is_dir():
        if not HUB_ID.match(spec):
            raise CheckpointError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}), a shipped model "
                                  f"({', '.join(shipped_models()) or 'none'}), a local directory, nor a hub id "
                                  "(owner/name)")
        directory = fetch_from_hub(spec, revision)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} (expected an official Moondream2 2025 checkpoint)")
    tensors = read_safetensors(weights)
    config_path = directory / CONFIG_FILE
    config = (MoondreamConfig.from_dict(json.loads(config_path.read_text())) if config_path.is_file()
              else PRESETS["moondream2"])
    try:
        tokenizer = load_tokenizer(config.tokenizer, directory)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    model = MoondreamModel(config, bos_id=tokenizer.bos_id, attention_backend=attention_backend)
    load_official_weights(model, weights, tensors)
    return LoadedModel(model, tokenizer, directory)


def save_model(loaded: LoadedModel, directory: Path) -> None:
    """Write weights in the official layout, plus the config and tokenizer needed to load them here."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_official_weights(loaded.model, directory / WEIGHTS_FILE)
    loaded.model.config.save(directory)
    if loaded.source_dir is not None and (loaded.source_dir / "tokenizer.json").is_file():
        shutil.copyfile(loaded.source_dir / "tokenizer.json", directory / "tokenizer.json")
