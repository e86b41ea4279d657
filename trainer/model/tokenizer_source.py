"""Which tokenizer a Moondream2 checkpoint was trained with, and where to get it.

The 2024 revisions ship their `tokenizer.json`; the 2025 revisions do not use their own
files but load a tokenizer from elsewhere, and which one changed from revision to
revision (read from the official code's history):

| revision            | tokenizer the official code loads      | bos = eos | prompt template     |
|---------------------|----------------------------------------|-----------|---------------------|
| before 2025-01-09   | the revision's own `tokenizer.json`    | 50256     | moondream2-legacy   |
| 2025-01-09 …        | vikhyatk/moondream2 @ 2024-08-26       | 50256     | moondream2-2025     |
| 2025-04-14 …        | vikhyatk/moondream2 @ 2025-01-09       | 50256     | moondream2-2025     |
| 2025-06-21 and later| moondream/starmie-v1 (unpinned)        | 0         | moondream2-starmie  |

A `tokenizer.json` beside the weights wins, except from 2025-06-21 on: those repositories
still ship the old GPT-2 style files, which the official code no longer reads.
`tokenizer=SPEC` (a local directory, a hub id or `id@revision`) overrides everything. Training with the wrong
tokenizer fails silently (the model reads garbage ids), so the choice is recorded with
every trial and export.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trainer.model.tokenizer import BpeTokenizer

TOKENIZER_FILE = "tokenizer.json"
DATED_REVISION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class TokenizerNotFound(FileNotFoundError):
    """No tokenizer could be found; the message says exactly what to download and where to put it."""


@dataclass(frozen=True)
class TokenizerRule:
    """What the official code of revisions from `since` on used."""

    since: str  # first revision (a date) the rule covers
    repo: Optional[str]  # None: the revision's own files
    repo_revision: Optional[str]
    bos_id: Optional[int]  # None: the tokenizer's <|endoftext|>
    template: str
    own_file_wins: bool = True  # a tokenizer.json beside the weights is the one to use


REVISION_RULES: tuple[TokenizerRule, ...] = (
    TokenizerRule("0000-00-00", None, None, None, "moondream2-legacy"),
    TokenizerRule("2025-01-09", "vikhyatk/moondream2", "2024-08-26", None, "moondream2-2025"),
    TokenizerRule("2025-04-14", "vikhyatk/moondream2", "2025-01-09", None, "moondream2-2025"),
    TokenizerRule("2025-06-21", "moondream/starmie-v1", None, 0, "moondream2-starmie", own_file_wins=False),
)
# A checkpoint without a dated revision (a local directory, `main`, a commit) is taken to be 2025-01-09-like:
# the layout this project writes, with the GPT-2 style tokenizer it ships beside its exports.
UNDATED_RULE = REVISION_RULES[1]


@dataclass(frozen=True)
class TokenizerChoice:
    """The tokenizer a model is used with: recorded in the trials table and every export's model card."""

    source: str  # a file path, or hub `id@revision`
    bos_id: int
    eos_id: int
    template: str  # the prompt template that goes with it, unless the job sets its own
    path: Optional[Path]  # the tokenizer.json read; None for the built-in character tokenizer

    def as_record(self) -> dict[str, Any]:
        """The columns of the trials table and the entries of a model card (`TOKENIZER_COLUMNS`)."""
        return {"tokenizer_source": self.source, "tokenizer_bos_id": self.bos_id, "tokenizer_eos_id": self.eos_id,
                "tokenizer_template": self.template}


TOKENIZER_COLUMNS: dict[str, type] = {"tokenizer_source": str, "tokenizer_bos_id": int, "tokenizer_eos_id": int,
                                   "tokenizer_template": str}


def check_revision(revision: Optional[str]) -> None:
    """A revision written as a date must be one: `2024-13-99` would otherwise pick a tokenizer rule by string
    order and then fail to download in every trial."""
    if revision is None or not DATED_REVISION.match(revision):
        return
    try:
        datetime.date.fromisoformat(revision)
    except ValueError:
        raise ValueError(f"revision {revision}: not a date; a dated revision is YYYY-MM-DD (e.g. 2025-01-09), "
                         "else a branch, tag or commit") from None


def rule_for(revision: Optional[str]) -> TokenizerRule:
    if revision is None or not DATED_REVISION.match(revision):
        return UNDATED_RULE
    return [rule for rule in REVISION_RULES if rule.since <= revision][-1]


def parse_spec(spec: str) -> tuple[Optional[Path], Optional[str], Optional[str]]:
    """`DIR` → (dir, None, None); `owner/name[@revision]` → (None, repo, revision)."""
    path = Path(spec).expanduser()
    if path.is_dir() or spec.startswith((".", "/", "~")):
        return path, None, None
    repo, _, revision = spec.partition("@")
    if not re.match(r"^[\w.-]+/[\w.-]+$", repo):
        raise ValueError(f"tokenizer {spec!r} is neither a local directory nor a hub id (owner/name or "
                         "owner/name@revision)")
    return None, repo, revision or None


def _download_hint(repo: str, revision: Optional[str], model_dir: Optional[Path]) -> str:
    at = f" --revision {revision}" if revision else ""
    where = model_dir if model_dir is not None else "DIR"
    return (f"download it where the hub can be reached (huggingface-cli download {repo} {TOKENIZER_FILE}{at} "
            f"--local-dir {where}) and put {TOKENIZER_FILE} beside the weights, or pass --set tokenizer=DIR")


def _from_hub(repo: str, revision: Optional[str], model_dir: Optional[Path]) -> Path:
    """`tokenizer.json` of `repo@revision` from the hub or its local cache; offline, one line saying what to
    fetch."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, TOKENIZER_FILE, revision=revision))
    except Exception as exc:  # offline, unknown repo or revision, auth: all end as one line
        raise TokenizerNotFound(
            f"the tokenizer {repo}@{revision or 'main'} could not be fetched ({type(exc).__name__}); "
            + _download_hint(repo, revision, model_dir)) from None


def resolve_tokenizer(model_dir: Optional[Path], *, revision: Optional[str] = None, spec: Optional[str] = None,
                      recorded: Optional[dict[str, Any]] = None) -> tuple[BpeTokenizer, TokenizerChoice]:
    """The BPE tokenizer for the checkpoint in `model_dir` (None: a preset, which needs `spec`) at hub
    `revision`, when known: `spec` if given, else a `tokenizer.json` beside the weights, else the one the
    official code of that revision loaded.
    `recorded` is what a model saved here wrote of its tokenizer (`TokenizerChoice.as_record`): it keeps the
    original source, ids and template of the tokenizer.json saved beside it."""
    rule = rule_for(revision)
    if spec is None and recorded and (model_dir / TOKENIZER_FILE).is_file():
        path = model_dir / TOKENIZER_FILE
        tokenizer = BpeTokenizer(path, special_id=int(recorded["tokenizer_bos_id"]))
        return tokenizer, TokenizerChoice(source=str(recorded["tokenizer_source"]), bos_id=tokenizer.bos_id,
                                          eos_id=tokenizer.eos_id, template=str(recorded["tokenizer_template"]),
                                          path=path)
    if spec is not None:
        directory, repo, repo_revision = parse_spec(spec)
        if directory is not None:
            path = directory / TOKENIZER_FILE
            if not path.is_file():
                raise TokenizerNotFound(f"tokenizer {spec}: no {TOKENIZER_FILE} in {directory}")
            source = str(path)
        else:
            path = _from_hub(repo, repo_revision, model_dir)
            source = f"{repo}@{repo_revision or 'main'}"
    elif (model_dir / TOKENIZER_FILE).is_file() and rule.own_file_wins:
        path, source = model_dir / TOKENIZER_FILE, str(model_dir / TOKENIZER_FILE)
    elif rule.repo is None:
        raise TokenizerNotFound(f"{model_dir}: no {TOKENIZER_FILE}; revision {revision} ships its own, so the "
                                f"download is incomplete: fetch {TOKENIZER_FILE} of that revision into {model_dir}")
    else:
        path = _from_hub(rule.repo, rule.repo_revision, model_dir)
        source = f"{rule.repo}@{rule.repo_revision or 'main'}"
    tokenizer = BpeTokenizer(path, special_id=rule.bos_id)
    choice = TokenizerChoice(source=source, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                             template=rule.template, path=path)
    return tokenizer, choice

