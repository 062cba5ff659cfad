"""One result file -> one markdown table (the schema is described in results/README.md)."""
from __future__ import annotations

import json
import pathlib

from cprec.errors import CprecError
from cprec.report.paths import RESULTS

REQUIRED = ("title", "source", "command", "machine", "columns")


class ResultFileError(CprecError, ValueError):
    """A result file that does not follow the schema; the message names the file and the field."""


def load_table(name: str, results: pathlib.Path = RESULTS) -> dict:
    """Reads results/NAME.json, with its rows inline or read from another file under results/."""
    path = results / f"{name}.json"
    if not path.exists():
        raise ResultFileError(f"{path}: no such result file (a docs marker names table:{name})")
    spec = json.loads(path.read_text())
    if "rows_from" in spec:  # "file.json#a/b": a benchmark's own JSON, copied unchanged, and a path in it
        file, _, where = spec["rows_from"].partition("#")
        rows = source = json.loads((results / file).read_text())
        for part in filter(None, where.split("/")):
            rows = rows[part]
        spec["rows"] = rows
        for key in ("command", "date"):  # what the benchmark recorded, unless the table says otherwise
            if key not in spec and key in source:
                spec[key] = source[key]
    for key in REQUIRED:
        if key not in spec:
            raise ResultFileError(f"{path}: missing field {key!r}")
    if not isinstance(spec.get("rows"), list):
        raise ResultFileError(f"{path}: 'rows' must be a list (or give 'rows_from')")
    return spec


def dump_table(spec: dict) -> str:
    """A result file's text: one line per field, column and row, so that a diff shows the row that changed."""
    line = lambda x: json.dumps(x, ensure_ascii=False)
    fields = []
    for key, value in spec.items():
        if key in ("columns", "rows"):
            fields.append(f" {line(key)}: [\n" + ",\n".join("  " + line(x) for x in value) + "\n ]")
        else:
            fields.append(f" {line(key)}: {line(value)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def tidy_results(results: pathlib.Path = RESULTS) -> list[pathlib.Path]:
    """Rewrites every table file in the layout of ``dump_table`` (hand-written files included)."""
    changed = []
    for path in sorted(results.glob("*.json")):
        text = path.read_text()
        spec = json.loads(text)
        if "columns" in spec and dump_table(spec) != text:
            path.write_text(dump_table(spec))
            changed.append(path)
    return changed


def format_cell(value, fmt: str | None, bold: bool = False, scale: float = 1) -> str:
    """A number times `scale` through the column's format ("{:,}", "{:.4f}", "{:.2f}x", "{:.1%}"); text as it is."""
    if value is None:
        text = ""
    elif fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        text = fmt.format(value * scale if scale != 1 else value)
    else:
        text = str(value)
    return f"**{text}**" if bold and text else text


def render_cell(row: dict, col: dict, bold: set) -> str:
    """A column shows one key, or several joined (`"keys": ["p50_ms", "p99_ms"], "sep": " / "`)."""
    fmt, scale = col.get("format"), col.get("scale", 1)
    if "keys" not in col:
        return format_cell(row.get(col["key"]), fmt, col["key"] in bold, scale)
    parts = [format_cell(row.get(k), fmt, k in bold, scale) for k in col["keys"]]
    return col.get("sep", " / ").join(p for p in parts if p)


def render_table(spec: dict) -> str:
    """The markdown of one table: the header, the rows, and a line saying where the numbers come from."""
    cols = spec["columns"]
    lines = ["| " + " | ".join(c["label"] for c in cols) + " |", "|" + " --- |" * len(cols)]
    for row in spec["rows"]:
        bold = set(row.get("_bold", ()))
        cells = [render_cell(row, c, bold) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + provenance(spec)


def provenance(spec: dict) -> str:
    """The rendered line under a table: command, machine, seeds, date and source of its numbers."""
    seeds = spec.get("seeds")
    command = spec["command"]
    parts = [f"`{command}`" if command.startswith("python") else command, spec["machine"]]
    if seeds is not None:
        parts.append("seeds " + (", ".join(map(str, seeds)) if isinstance(seeds, list) else str(seeds)))
    if spec.get("date"):
        parts.append(spec["date"])
    parts.append(spec["source"])
    return "<sub>" + "; ".join(parts) + ".</sub>"
