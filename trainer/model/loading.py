"""Resolve a model spec (preset name, local directory, hub id) to a model and its tokenizer."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer.model.attention import AttentionBackend
from trainer.model.config import CONFIG_FILE, PRESETS, SHIPPED_MODELS_DIR, MoondreamConfig, shipped_models
from trainer.model.network import MoondreamModel
from trainer.model.tokenizer import CharTokenizer, PromptTemplate, Tokenizer, get_template
from trainer.model.tokenizer_source import TOKENIZER_FILE, TokenizerChoice, resolve_tokenizer
from trainer.model.weights import HUB_ID, WEIGHTS_FILE, CheckpointError, checkpoint_keys, fetch_from_hub, \
    load_official_weights, save_official_weights


@dataclass
class LoadedModel:
    model: MoondreamModel
    tokenizer: Tokenizer
    source_dir: Optional[Path]  # where weights and tokenizer came from; None for a fresh preset
    tokenizer_choice: TokenizerChoice  # which tokenizer, its bos/eos and template: recorded with results
    layout: Optional[str] = None  # the checkpoint layout the weights were read in; None for a fresh preset

    def template(self, name: Optional[str]) -> PromptTemplate:
        """The prompt template `name`, or (None) the one that goes with this model's tokenizer."""
        return get_template(name or self.tokenizer_choice.template)


# Saved models record the tokenizer they were trained with here (inside mdsweep_config.json), so an export of a
# starmie-era checkpoint keeps bos = eos = 0 and its template once the revision is no longer known.
CHOICE_KEY = "tokenizer_choice"


@dataclass
class ModelText:
    """What a model reads and writes text with, found without loading its weights."""

    config: MoondreamConfig
    tokenizer: Tokenizer
    choice: TokenizerChoice
    directory: Optional[Path]  # None for a preset


def model_text(spec: str, *, revision: Optional[str] = None, tokenizer: Optional[str] = None,
               check_weights: bool = False) -> ModelText:
    """The sizes and tokenizer `spec` loads with (see `load_model`); `check_weights` also checks the checkpoint's
    names and shapes against the sizes, from its header, so that a checkpoint that does not fit fails before
    a model is built."""
    if spec in PRESETS:
        tok = preset_tokenizer(spec)
        return ModelText(PRESETS[spec], tok, builtin_choice(tok), None)
    directory = model_directory(spec, revision)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} (expected an official Moondream2 checkpoint)")
    config_path = directory / CONFIG_FILE
    saved = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config = MoondreamConfig.from_dict(saved) if saved else PRESETS["moondream2"]
    if check_weights:
        checkpoint_keys(weights, config)
    if config.tokenizer == "char":
        tok: Tokenizer = CharTokenizer()
        return ModelText(config, tok, builtin_choice(tok), directory)
    try:
        tok, choice = resolve_tokenizer(directory, revision=revision, spec=tokenizer, recorded=saved.get(CHOICE_KEY))
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    return ModelText(config, tok, choice, directory)


def load_model(spec: str, *, revision: Optional[str] = None, tokenizer: Optional[str] = None,
               attention_backend: AttentionBackend = "sdpa") -> LoadedModel:
    """A preset name gives fresh random weights (seed torch first); a shipped model's name, a directory or a
    hub id loads weights, in any layout the official loader accepts. `tokenizer` overrides the checkpoint's
    own (a directory, hub id or id@revision); `revision` is the hub revision, which also decides the tokenizer
    of a 2025 checkpoint that has none of its own."""
    text = model_text(spec, revision=revision, tokenizer=tokenizer, check_weights=True)
    model = MoondreamModel(text.config, bos_id=text.tokenizer.bos_id, attention_backend=attention_backend)
    if text.directory is None:
        return LoadedModel(model, text.tokenizer, None, text.choice)
    keys = load_official_weights(model, text.directory / WEIGHTS_FILE)
    return LoadedModel(model, text.tokenizer, text.directory, text.choice, keys.layout.name)


def model_directory(spec: str, revision: Optional[str]) -> Path:
    """The local directory of a shipped model, a path, or a hub id (fetched). Something written as a path
    (starting with ., / or ~, or with more than one /) is never looked up on the hub."""
    if spec in shipped_models():
        return SHIPPED_MODELS_DIR / spec
    directory = Path(spec).expanduser()
    if directory.is_dir():
        return directory
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise CheckpointError(f"model {spec}: no such directory")
    if not HUB_ID.match(spec):
        raise CheckpointError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}), a shipped model "
                              f"({', '.join(shipped_models()) or 'none'}), a local directory, nor a hub id "
                              "(owner/name)")
    return fetch_from_hub(spec, revision)


def builtin_choice(tok: Tokenizer) -> TokenizerChoice:
    return TokenizerChoice(source="char (built in)", bos_id=tok.bos_id, eos_id=tok.eos_id,
                           template="moondream2-2025", path=None)


def preset_tokenizer(name: str) -> Tokenizer:
    """A preset's tokenizer. The real-size preset has fresh weights and no tokenizer.json to go with them, so
    the character tokenizer stands in (its ids lie inside the real vocabulary): memory and speed of the real
    model can then be measured anywhere, while its answers mean nothing."""
    if PRESETS[name].tokenizer == "bpe":
        print(f"mdsweep: model {name!r} is the real-size preset with fresh weights and no tokenizer.json: a "
              f"character tokenizer stands in ({CharTokenizer().vocab_size} of the {PRESETS[name].text.vocab_size} "
              "ids); memory and speed are representative, answers are not", file=sys.stderr, flush=True)
    return CharTokenizer()


def save_model(loaded: LoadedModel, directory: Path) -> None:
    """Write weights in the official 2025 layout, plus the config and the tokenizer (its `tokenizer.json`, and
    the choice in the config) needed to load them here with nothing else at hand."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_official_weights(loaded.model, directory / WEIGHTS_FILE)
    choice = loaded.tokenizer_choice
    saved = {**loaded.model.config.to_dict(), CHOICE_KEY: choice.as_record()}
    (directory / CONFIG_FILE).write_text(json.dumps(saved, indent=1))
    if choice.path is not None and choice.path.resolve() != (directory / TOKENIZER_FILE).resolve():
        shutil.copyfile(choice.path, directory / TOKENIZER_FILE)
