"""The docs are kept honest: every verb and option of the `bonescan` parser is in docs/cli.md,
every relative link in the README and docs/ resolves, and nothing points outside the repository.

In the spirit of sqlite-utils' ``tests/test_docs.py``: the parser is walked, not a hand-kept list,
so a new option without documentation fails here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonescan_core.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
# Markdown links and images: [text](target) / ![alt](target "title").
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A file name ending in .md, as prose or code mentions it (``docs/cli.md``, `security.md`).
MD_MENTION = re.compile(r"(?<![\w./-])((?:\.\./|\./|/)?[\w./-]*[\w-]\.md)\b")
GENERATED_MD = {"model_card.md"}  # files bonescan writes (a bundle's model card), not files of the repository
SKIPPED_DIRS = {".git", ".pytest_cache", ".ruff_cache", "__pycache__", "runs", "build", "test-artifacts"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yml", ".yaml", ".html", ".sh"}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(verb path, parser) for the top parser and every sub-parser, recursively: ("account", "add")."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """The long options of one parser (``--help`` aside)."""
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]


def _choices(parser: argparse.ArgumentParser) -> list[str]:
    """The word choices of its arguments (``--mode fast``, ``labels export``, ``sign-in on``)."""
    return [str(c) for a in parser._actions if not isinstance(a, argparse._SubParsersAction)
            for c in (a.choices or []) if isinstance(c, str)]


def _sections(text: str) -> dict[str, str]:
    """Heading text -> its body, for every ``##``/``###`` heading of a Markdown text."""
    parts = re.split(r"^(#{2,3} .+)$", text, flags=re.M)
    return {parts[i].lstrip("#").strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _code(text: str) -> str:
    """What a Markdown text shows as code: fenced blocks and inline spans, one per line."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    without_fences = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return "\n".join([*fenced, *re.findall(r"`([^`\n]+)`", without_fences)])


def _has_token(code: str, token: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", code) is not None


def _verb_section(sections: dict[str, str], verb: str) -> str:
    """The body of the ``###`` section whose heading names ``verb`` (``images and studies``)."""
    for heading, body in sections.items():
        if verb in heading.split():
            return body
    return ""


def parser_entries() -> list[tuple[str, str, str]]:
    """(verb path, kind, token) for every verb, sub-verb, option and choice of the parser."""
    entries = []
    for path, parser in _walk(build_parser()):
        label = " ".join(path) or "bonescan"
        if len(path) == 1:
            entries.append((label, "verb", path[0]))
        elif len(path) > 1:
            entries.append((label, "sub-verb", " ".join(path)))
        entries += [(label, "option", option) for option in _options(parser)]
        entries += [(label, "choice", choice) for choice in _choices(parser)]
    return entries


def test_the_parser_walk_finds_verbs_sub_verbs_options_and_choices() -> None:
    entries = parser_entries()
    assert ("train", "option", "--max-train-images") in entries
    assert ("account sign-in", "sub-verb", "account sign-in") in entries
    assert ("labels", "choice", "export") in entries
    assert ("bonescan", "option", "--db") in entries


@pytest.mark.parametrize(("verb", "kind", "token"), parser_entries(), ids=lambda value: str(value))
def test_cli_md_documents_every_verb_and_option(verb: str, kind: str, token: str) -> None:
    """A verb has a ``###`` section; its options, sub-verbs and choices are code in that section."""
    sections = _sections(CLI_MD.read_text(encoding="utf-8"))
    top = verb.split()[0]
    if kind == "verb":
        assert _verb_section(sections, top), f"docs/cli.md has no `### {top}` section"
        return
    body = sections.get("Global", "") if top == "bonescan" else _verb_section(sections, top)
    assert _has_token(_code(body), token), (
        f"docs/cli.md does not document {kind} `{token}` of `bonescan {verb}` "
        f"(write it as code in the section of `{top}`)"
    )


def test_the_cli_md_check_fails_on_a_missing_option() -> None:
    """Removing one option from the page makes it undocumented (the check above can fail)."""
    sections = _sections(CLI_MD.read_text(encoding="utf-8").replace("--opacity", "--opaque"))
    assert not _has_token(_code(_verb_section(sections, "explain")), "--opacity")
    assert _has_token(_code(_verb_section(sections, "explain")), "--out")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if not path:  # a link within the page
            if anchor not in _anchors(text):
                broken.append(target)
            continue
        resolved = (doc.parent / path).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links that do not resolve inside the repository: {broken}"


def repository_text_files() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in relative.parts[:-1]):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
            yield path


def test_nothing_points_outside_the_repository() -> None:
    """Every ``*.md`` a file names exists (from the repository root or beside the file), and no
    file names a folder outside the repository."""
    problems = []
    for path in repository_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        relative = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(text.splitlines(), start=1):
            if "../shared" in line or "/work/" in line:
                problems.append(f"{relative}:{number}: points outside the repository")
            for name in MD_MENTION.findall(line):
                if name.rsplit("/", 1)[-1] in GENERATED_MD:
                    continue
                candidates = [(ROOT / name).resolve(), (path.parent / name).resolve()]
                if not any(c.is_relative_to(ROOT) and c.is_file() for c in candidates):
                    problems.append(f"{relative}:{number}: names {name}, which is not in the repository "
                                    "(write its path from the repository root, e.g. docs/cli.md)")
    assert not problems, "\n".join(problems)


def test_architecture_md_lists_every_module() -> None:
    """Each module and subpackage of bonescan_core has its line in docs/architecture.md's module list."""
    sections = _sections((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    listed = set(re.findall(r"^\s*(\w+)(?:\.py|/)", _code(sections.get("Modules", "")), flags=re.M))
    package = ROOT / "bonescan_core"
    names = {p.stem for p in package.rglob("*.py") if not p.name.startswith("__")}
    names |= {p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert names <= listed, f"docs/architecture.md does not list {sorted(names - listed)}"
