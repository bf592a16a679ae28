"""Every relative link in the repository's Markdown resolves: the file or folder exists inside the
repository, and a ``#fragment`` names a heading (or an ``id``/``name`` anchor) of the target page.

Links to the web (``https:``, ``mailto:``) are not followed; links inside code spans and fenced code
blocks are not links. A link that leaves the repository (``../shared/...``) is broken for everyone
who clones it, so it fails too.
"""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = {".git", ".venv", ".ci-venv", "build", "dist", "runs", "outputs", ".pytest_cache", ".torch_ext",
              "node_modules", "__pycache__"}

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
HTML_ANCHOR = re.compile(r"<[^>]+\b(?:id|name)=\"([^\"]+)\"")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files():
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
                                cwd=REPO, capture_output=True, text=True, check=True, timeout=30).stdout.split()
        files = [REPO / name for name in listed]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (an unpacked archive)
        files = [p for p in REPO.rglob("*.md") if not NOT_SOURCE.intersection(p.relative_to(REPO).parts)]
    return sorted(p for p in files if p.is_file())


def prose(text: str) -> str:
    """The text with code blocks and code spans blanked out (line numbers kept)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(page: Path) -> set:
    text = page.read_text(encoding="utf-8")
    found, seen = set(), {}
    for heading in HEADING.findall(FENCE.sub("", text)):  # a "# comment" in a code block is no heading
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found | set(HTML_ANCHOR.findall(text))


def links(page: Path):
    text = prose(page.read_text(encoding="utf-8"))
    for pattern in (INLINE, REFERENCE):
        for match in pattern.finditer(text):
            yield text.count("\n", 0, match.start()) + 1, match.group(1)


def broken_links(page: Path, anchor_cache: dict):
    for line, target in links(page):
        if SCHEME.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(REPO)}:{line}: {target}"
        if REPO not in resolved.parents and resolved != REPO:
            yield f"{where} (leaves the repository)"
        elif not resolved.exists():
            yield f"{where} (no such file)"
        elif fragment and resolved.suffix == ".md":
            if resolved not in anchor_cache:
                anchor_cache[resolved] = anchors(resolved)
            if fragment not in anchor_cache[resolved]:
                yield f"{where} (no heading with anchor #{fragment} in {resolved.relative_to(REPO)})"


def test_every_relative_markdown_link_resolves():
    pages = markdown_files()
    assert REPO / "README.md" in pages and REPO / "docs" / "BENCHMARKS.md" in pages
    cache: dict = {}
    broken = [problem for page in pages for problem in broken_links(page, cache)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checker_sees_what_it_must(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top: `a` b\n\n## Top: `a` b\n\n[x](#top-a-b-1) `[code](nowhere.md)`\n\n"
                    "```\n[fenced](nowhere.md)\n```\n![img](pic.png \"title\")\n[ref]: other.md#sec\n")
    assert anchors(page) == {"top-a-b", "top-a-b-1"}
    assert list(links(page)) == [(5, "#top-a-b-1"), (10, "pic.png"), (11, "other.md#sec")]
    assert slug("Post-training: PMA vs GA (`benchmarks/post_training.py`)") == \
        "post-training-pma-vs-ga-benchmarkspost_trainingpy"
    assert slug("Worked example: ZeRO-2, K = 4, 2 ranks") == "worked-example-zero-2-k--4-2-ranks"
