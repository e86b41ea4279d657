"""The README and the manual in docs/: short enough to read, every link resolves, every flag documented."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from orchestrator.cli.main import build_parser
from orchestrator.cli.reference import reference, subcommands

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.M):
        slugs.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return slugs


def broken_links(page: Path) -> list[str]:
    """Relative links (file, file#anchor or #anchor) of a page that point nowhere."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_the_readme_is_read_in_five_minutes():
    assert len((ROOT / "README.md").read_text()) <= 12_000


def test_every_relative_link_resolves():
    assert len(PAGES) >= 8
    assert [b for page in PAGES for b in broken_links(page)] == []


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text("[ok](there.md#a-heading) [gone](missing.md) [bad](there.md#other) [web](https://x.org/y)\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)", "page.md: there.md#other (no such heading)"]


def test_every_command_and_flag_is_in_the_command_reference():
    page = (ROOT / "docs" / "cli.md").read_text()
    commands = list(subcommands(build_parser(), "mdsweep"))
    assert len(commands) >= 12
    for name, parser in commands:
        assert f"## {name}\n" in page or not any(a.option_strings for a in parser._actions
                                                   if not isinstance(a, argparse._HelpAction)), name
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in page, f"{name} {flag} is not in docs/cli.md"


def test_the_command_reference_is_current():
    """docs/cli.md is generated from the parser: regenerate it with `python -m orchestrator.cli.reference > docs/cli.md`."""
    assert (ROOT / "docs" / "cli.md").read_text() == reference()
