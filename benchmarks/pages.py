"""The generated parts of the benchmark detail pages (``docs/bench/*.md``).

A benchmark script owns one section of a page per result set, between two marker lines, and
rewrites only that section: the hand-written prose around it and the sections of other result sets
(another base model, another run) stay as they are. Results themselves (JSON, plots) live under
``benchmarks/results/``; see its README.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAGES = REPO / "docs" / "bench"


def link(page: Path, target: Path) -> str:
    """``target`` relative to the page's folder, as a Markdown link needs it."""
    return Path(os.path.relpath(Path(target).resolve(), Path(page).resolve().parent)).as_posix()


def repo_path(path: Path) -> str:
    """``path`` as a command run from the repository root spells it (relative when it is inside)."""
    path = Path(path).resolve()
    return path.relative_to(REPO).as_posix() if REPO in path.parents else str(path)


def write_section(page: Path, key: str, body: str, title: str) -> None:
    """Put ``body`` between the ``key`` markers of ``page``, replacing what was there.

    A page that does not exist yet is started with ``title``; a page without the markers gets the
    section appended."""
    begin, end = f"<!-- generated: {key} -->", f"<!-- end generated: {key} -->"
    page = Path(page)
    text = page.read_text() if page.exists() else f"# {title}\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        if end not in rest:
            raise SystemExit(f"{page}: the line {begin!r} has no matching {end!r}; fix the page by hand")
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def add_report_options(parser, out: str, page: str) -> None:
    """``--out`` (the result JSON), ``--report-only`` and ``--page``, as the JSON-writing benchmarks take them."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: write the tables of the --out JSON to its section of --page")
    parser.add_argument("--page", default=str(PAGES / page))


def read_result(source: Path) -> dict:
    if not source.exists():
        raise SystemExit(f"--report-only: {source} does not exist (run the benchmark with --out {source} first)")
    return json.loads(source.read_text())
