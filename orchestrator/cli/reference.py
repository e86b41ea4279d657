"""The flag reference in `docs/cli.md`, written from the parser itself so the page cannot drift from the code.

    python -m orchestrator.cli.reference > docs/cli.md

A test compares the page with this output, so a new flag without a regenerated page fails there.
"""
from __future__ import annotations

import argparse
from typing import Iterator

from orchestrator.cli.main import build_parser

INTRO = """# `mdsweep` command reference

Every command and flag, with its help text, as `mdsweep COMMAND --help` prints it. This page is generated
(`python -m orchestrator.cli.reference > docs/cli.md`); the guides are [sweeps](sweeps.md),
[training one job](train.md), [models](models.md), [data](data.md), [memory](memory.md),
[cluster](cluster.md) and [results](results.md).
"""


def subcommands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(full command, parser) for every command under `parser`, depth first, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from subcommands(sub, f"{prefix} {name}")


def flag_rows(parser: argparse.ArgumentParser) -> list[str]:
    """One Markdown table row per argument: its spellings (or positional name), and its help with the default."""
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
        if action.option_strings and action.nargs != 0:
            names += f" `{action.metavar or action.dest.upper()}`"
        text = (action.help or "").replace("%(default)s", str(action.default)).replace("|", "\\|")
        text = " ".join(text.split())
        rows.append(f"| {names} | {text} |")
    return rows


def first_sentence(text: str) -> str:
    """A description's first sentence, for the one-line table of commands."""
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def reference() -> str:
    """The whole page: the commands in one table, then each command's flags."""
    parser = build_parser()
    commands = [(name, sub) for name, sub in subcommands(parser, "mdsweep")]
    lines = [INTRO, "| command | what it does |", "|---|---|"]
    lines += [f"| {f'[`{name}`](#' + name.replace(' ', '-') + ')' if flag_rows(sub) else f'`{name}`'} "
              f"| {first_sentence(sub.description or '')} |" for name, sub in commands]
    for name, sub in commands:
        rows = flag_rows(sub)
        if not rows:
            continue
        lines += ["", f"## {name}", "", f"`{' '.join(sub.format_usage().split()[1:])}`", "",
                  "| argument | meaning |", "|---|---|", *rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
