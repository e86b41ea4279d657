"""Resolve a model spec (preset name, local directory, hub id) to a model and its tokenizer.

`model_text` checks everything a user can get wrong from files alone and loads neither torch nor the network, so
that a sweep's driver checks a model in well under a second before Ray starts; `load_model` builds the network."""
from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from trainer.model.choices import AttentionBackend
from trainer.model.config import CONFIG_FILE, PRESETS, SHIPPED_MODELS_DIR, WEIGHTS_FILE, MoondreamConfig, \
    read_saved_config, shipped_models
from trainer.model.layouts import CheckpointError, checkpoint_keys
from trainer.model.tokenizer import CharTokenizer, PromptTemplate, Tokenizer, get_template
from trainer.model.tokenizer_source import TOKENIZER_FILE, TokenizerChoice, check_revision, resolve_tokenizer

if TYPE_CHECKING:
    from trainer.model.network import MoondreamModel

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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
    """The sizes and tokenizer `spec` loads with (see `load_model`), every input a user can get wrong checked
    from files alone: the revision, the config, the tokenizer's ids against the vocabulary and (`check_weights`)
    the checkpoint's names, shapes and dtypes from its header. `predict`, `train` and the sweep's pre-flight all
    check a model here, so that none of them meets a bad one as a traceback inside the network."""
    try:
        check_revision(revision)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if spec in PRESETS:
        config, directory, saved = PRESETS[spec], None, None
    else:
        directory = model_directory(spec, revision)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} (expected an official Moondream2 checkpoint)")
        try:
            saved = read_saved_config(directory)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        config = MoondreamConfig.from_dict(saved) if saved is not None else PRESETS["moondream2"]
        if check_weights:
            check_checkpoint(weights, config, assumed=saved is None)
    tok, choice = text_tokenizer(spec, config, directory, revision=revision, tokenizer=tokenizer,
                                 recorded=(saved or {}).get(CHOICE_KEY))
    if choice.path is not None:  # a tokenizer.json read: the saved model must read it again
        config = replace(config, tokenizer="bpe")
    check_vocabulary(tok, choice, config)
    return ModelText(config, tok, choice, directory)


def check_checkpoint(weights: Path, config: MoondreamConfig, *, assumed: bool) -> None:
    """The header against the sizes. Without a config file the sizes are the real Moondream2's, an assumption
    the message then states, since a small model's directory without its config otherwise reads as a broken
    checkpoint."""
    try:
        checkpoint_keys(weights, config)
    except CheckpointError as exc:
        if not assumed:
            raise
        raise CheckpointError(f"{weights.parent}: no {CONFIG_FILE}, so the real Moondream2 sizes were assumed, and "
                              f"the weights disagree: {exc}. A model saved by mdsweep keeps its {CONFIG_FILE} "
                              "beside the weights: copy it back") from None


def text_tokenizer(spec: str, config: MoondreamConfig, directory: Optional[Path], *, revision: Optional[str],
                   tokenizer: Optional[str], recorded: Optional[dict]) -> tuple[Tokenizer, TokenizerChoice]:
    """The tokenizer a model reads with: `tokenizer` (a spec) overrides everything, the built-in character
    tokenizer included, as docs/models.md promises; else a preset's, the character tokenizer of a `char`
    config, or the BPE tokenizer the checkpoint's revision calls for."""
    if tokenizer is None and spec in PRESETS:
        tok = preset_tokenizer(spec)
        return tok, builtin_choice(tok)
    if tokenizer is None and config.tokenizer == "char":
        tok = CharTokenizer()
        return tok, builtin_choice(tok)
    try:
        return resolve_tokenizer(directory, revision=revision, spec=tokenizer, recorded=recorded)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None


def check_vocabulary(tok: Tokenizer, choice: TokenizerChoice, config: MoondreamConfig) -> None:
    """Every id the tokenizer can give must have a row in the model's embedding: an id past it is an IndexError
    inside `torch.embedding`, in every trial."""
    rows = config.text.vocab_size
    if tok.vocab_size > rows or max(tok.bos_id, tok.eos_id) >= rows:
        raise CheckpointError(f"tokenizer {choice.source}: {tok.vocab_size} ids, but the model's vocabulary has "
                              f"{rows} rows; pass the tokenizer the model was trained with (--tokenizer; in a sweep "
                              "--set tokenizer=)")


def load_model(spec: str, *, revision: Optional[str] = None, tokenizer: Optional[str] = None,
               attention_backend: AttentionBackend = "sdpa") -> LoadedModel:
    """A preset name gives fresh random weights (seed torch first); a shipped model's name, a directory or a
    hub id loads weights, in any layout the official loader accepts. `tokenizer` overrides the checkpoint's
    own (a directory, hub id or id@revision); `revision` is the hub revision, which also decides the tokenizer
    of a 2025 checkpoint that has none of its own."""
    from trainer.model.network import MoondreamModel
    from trainer.model.weights import load_official_weights

    text = model_text(spec, revision=revision, tokenizer=tokenizer, check_weights=True)
    model = MoondreamModel(text.config, bos_id=text.tokenizer.bos_id, attention_backend=attention_backend)
    if text.directory is None:
        return LoadedModel(model, text.tokenizer, None, text.choice)
    keys = load_official_weights(model, text.directory / WEIGHTS_FILE)
    return LoadedModel(model, text.tokenizer, text.directory, text.choice, keys.layout.name)


def model_directory(spec: str, revision: Optional[str]) -> Path:
    """The local directory of a shipped model, a path, or a hub id (fetched)."""
    return local_model_directory(spec) or fetch_from_hub(spec, revision)


def fetch_from_hub(repo_id: str, revision: Optional[str]) -> Path:
    """Download a checkpoint's weights, tokenizer and config; a clear error when offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=[WEIGHTS_FILE, TOKENIZER_FILE, "*.json"]))
    except Exception as exc:  # network, auth and missing-revision errors all end here
        raise CheckpointError(
            f"could not fetch {repo_id}@{revision or 'main'} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Without network access, download the repository elsewhere and pass its local directory as the model."
        ) from exc


def local_model_directory(spec: str) -> Optional[Path]:
    """The local directory of a shipped model or a path; None for a hub id, which is fetched. Something written
    as a path (starting with ., / or ~, or with more than one /) is never looked up on the hub."""
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
    return None


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
    from trainer.model.weights import save_official_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_official_weights(loaded.model, directory / WEIGHTS_FILE)
    choice = loaded.tokenizer_choice
    saved = {**loaded.model.config.to_dict(), CHOICE_KEY: choice.as_record()}
    (directory / CONFIG_FILE).write_text(json.dumps(saved, indent=1))
    if choice.path is not None and choice.path.resolve() != (directory / TOKENIZER_FILE).resolve():
        shutil.copyfile(choice.path, directory / TOKENIZER_FILE)
