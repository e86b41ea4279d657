"""Resolve a model spec (preset name, local directory, hub id) to a model and its tokenizer."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer.attention import AttentionBackend
from trainer.config import CONFIG_FILE, PRESETS, SHIPPED_MODELS_DIR, MoondreamConfig, shipped_models
from trainer.model import MoondreamModel
from trainer.tokenizer import CharTokenizer, Tokenizer, load_tokenizer
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
        tokenizer = preset_tokenizer(spec)
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


def preset_tokenizer(name: str) -> Tokenizer:
    """A preset's tokenizer. The real-size preset has fresh weights and no tokenizer.json to go with them, so
    the character tokenizer stands in (its ids lie inside the real vocabulary): memory and speed of the real
    model can then be measured anywhere, while its answers mean nothing."""
    config = PRESETS[name]
    if config.tokenizer == "bpe":
        print(f"mdsweep: model {name!r} is the real-size preset with fresh weights and no tokenizer.json: a "
              f"character tokenizer stands in ({CharTokenizer().vocab_size} of the {config.text.vocab_size} "
              "ids); memory and speed are representative, answers are not", file=sys.stderr, flush=True)
        return CharTokenizer()
    return load_tokenizer(config.tokenizer, None)


def save_model(loaded: LoadedModel, directory: Path) -> None:
    """Write weights in the official layout, plus the config and tokenizer needed to load them here."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_official_weights(loaded.model, directory / WEIGHTS_FILE)
    loaded.model.config.save(directory)
    if loaded.source_dir is not None and (loaded.source_dir / "tokenizer.json").is_file():
        shutil.copyfile(loaded.source_dir / "tokenizer.json", directory / "tokenizer.json")
