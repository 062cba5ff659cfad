"""Replaces the text between `<!-- table:NAME -->` and `<!-- /table:NAME -->` with NAME's table."""
from __future__ import annotations

import pathlib
import re

from cprec.report.paths import RESULTS, doc_files
from cprec.report.table import load_table, render_table

BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def render_text(text: str, results: pathlib.Path = RESULTS) -> str:
    """The markdown with every marked table rendered from its result file."""
    return BLOCK.sub(lambda m: m.group(1) + render_table(load_table(m["name"], results)) + "\n" + m.group(4), text)


def table_names(text: str) -> list[str]:
    return [m["name"] for m in BLOCK.finditer(text)]


def render_docs(check: bool = False, root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Renders every marked table in README.md and docs/*.md; returns the files that changed (or would)."""
    files = doc_files(root) if root else doc_files()
    results = (root / "results") if root else RESULTS
    changed = []
    for path in files:
        text = path.read_text()
        new = render_text(text, results)
        if new != text:
            changed.append(path)
            if not check:
                path.write_text(new)
    return changed
