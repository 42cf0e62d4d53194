"""The documentation's relative links resolve: every ``[text](path)`` and ``![alt](path)`` in README.md,
docs/**/*.md, bench/RESULTS.md and csrc/README.md names a file of the repository (relative to the file that
holds the link), and a ``#anchor`` into a Markdown file names one of its headings (GitHub's slugs). The
README stays short (at most 300 lines; everything else lives in docs/)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) or ![alt](target), the text possibly holding one level of brackets; an optional "title"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "bench" / "RESULTS.md", ROOT / "csrc" / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text, lowercased, without punctuation other than - and _,
    spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"[*_]{1,3}([^*_]+)[*_]{1,3}", r"\1", text)  # emphasis markers
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One message per relative link of ``path`` that does not resolve inside ``root``."""
    problems = []
    root = root.resolve()
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub(" ", line)):
            target = m.group(1)
            where = f"{path.relative_to(root)}:{number}: {target}"
            if EXTERNAL.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
            if not dest.is_relative_to(root):
                problems.append(f"{where}: outside the repository")
                continue
            if not dest.exists():
                problems.append(f"{where}: no such file")
                continue
            if anchor and dest.suffix == ".md":
                if not dest.is_file():
                    problems.append(f"{where}: an anchor into a folder")
                elif unquote(anchor) not in anchors(dest):
                    problems.append(f"{where}: no heading with this anchor in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_docs_exist() -> None:
    names = {str(p.relative_to(ROOT)) for p in doc_files()}
    assert {"README.md", "bench/RESULTS.md", "docs/results.md"} <= names


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_readme_names_the_ci_test_command() -> None:
    """.ci/run runs README command (2) verbatim."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/test.sh      # (2)" in readme
    assert "bash scripts/demo.sh      # (1)" in readme
    assert "\nbash scripts/test.sh\n" in ci


def test_slugs_follow_github() -> None:
    assert slug("Results on Fashion-MNIST") == "results-on-fashion-mnist"
    assert slug("Training from the command line: `hdkd-fast`") == "training-from-the-command-line-hdkd-fast"
    assert slug('Native backend (`backend="native"`): building') == "native-backend-backendnative-building"
    assert slug("HDKD's neighbours: EKD, ERDE") == "hdkds-neighbours-ekd-erde"
    assert slug("What a step does, `update_every`") == "what-a-step-does-update_every"


def test_the_check_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some part: `x`\n")
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#some-part-x) [ok](#here) ![ok](img.png) [web](https://example.com)\n"
        "# Here\n"
        "`[in code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[missing](docs/b.md)\n"
        "[bad anchor](docs/a.md#no-such-part)\n"
        "![missing image](docs/img.png)\n"
        "[outside](../elsewhere.md)\n"
        "[bad own anchor](#there)\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ")[1] for p in problems] == [
        "docs/b.md", "docs/a.md#no-such-part", "docs/img.png", "../elsewhere.md", "#there",
    ], problems
