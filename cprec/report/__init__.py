"""Docs tables and plots rendered from the result files committed under `results/`.

`python -m cprec.report` re-renders every table between `<!-- table:NAME -->` markers in README.md
and docs/*.md from `results/NAME.json`, and every plot in docs/img/; `tests/test_report.py` fails
when a committed table differs from what its JSON renders. The file format is in results/README.md.
"""
from cprec.report.markers import render_docs
from cprec.report.table import load_table, render_table

__all__ = ["load_table", "render_table", "render_docs"]
