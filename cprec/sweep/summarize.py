"""`python run.py --summarize runs/<sweep>`: one row per trial, printed and written to summary.csv."""
from __future__ import annotations

import csv
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

from cprec.errors import CprecError
from cprec.sweep.launch import is_active, read_status

TABLE_TEST = ("hr@10", "ndcg@10", "mrr@5")  # the rest of the test metrics go to the CSV only
SEEDS_TEST = ("hr@10", "ndcg@10", "mrr@10")  # columns of the over-seeds table
SEED_KEY = "seed"


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _trials(root: pathlib.Path) -> list[dict[str, Any]]:
    """Trial records from sweep.json, else from the trial.json of every subdirectory."""
    sweep = _read_json(root / "sweep.json")
    if sweep.get("trials"):
        return sweep["trials"]
    records = [_read_json(d / "trial.json") for d in sorted(root.iterdir()) if (d / "trial.json").exists()]
    return sorted(records, key=lambda r: r.get("index", 0))


def _metrics(path: pathlib.Path) -> list[dict[str, float]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return rows


def trial_row(root: pathlib.Path, record: dict[str, Any]) -> dict[str, Any]:
    """Everything known about one trial: overrides, size, best validation, test, speed, status."""
    workdir = root / record["name"]
    results = _read_json(workdir / "results.json")
    config = _read_json(workdir / "config.json")
    lines = _metrics(workdir / "metrics.jsonl")
    status = read_status(workdir)
    state = status.get("status", "not started")
    if state in ("submitted", "running", "requeued") and not is_active(status):
        state = "stopped"  # its process or job is gone without a result; rerunning resumes it
    select = config.get("train", {}).get("select_metric", "ndcg@10")
    report = results.get("report") or next((r for r in lines if "params/total" in r), {})
    val = [(r[f"val/{select}"], r["step"]) for r in lines if f"val/{select}" in r]
    best_val, best_step = max(val, key=lambda v: (v[0], -v[1])) if val else (math.nan, None)
    speeds = [r["train/tokens_per_sec"] for r in lines if "train/tokens_per_sec" in r]
    row = {"index": record["index"], "trial": record["name"],
           "overrides": " ".join(f"{k}={_text(v)}" for k, v in record.get("overrides", {}).items()),
           "status": state, "step": max((r["step"] for r in lines), default=0),
           "params_total": report.get("params/total", math.nan),
           "compression_ratio": report.get("params/compression_ratio", math.nan),
           "select_metric": select, "best_val": best_val, "best_val_step": best_step,
           **{f"test_{k}": results["test"][k] for k in sorted(results.get("test", {}), key=_metric_order)},
           "tokens_per_sec": speeds[-1] if speeds else math.nan,
           "error": status.get("error", "") if state == "failed" else ""}
    for key, value in record.get("overrides", {}).items():
        row[f"set.{key}"] = _text(value)
    return row


def _metric_order(name: str) -> tuple:
    family, _, k = name.partition("@")
    order = ("hr", "ndcg", "mrr")
    return (order.index(family) if family in order else len(order), family, int(k) if k.isdigit() else 0)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(map(str, value)) + ")"
    return str(value)


def _cell(value: Any, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "compression_ratio":
        return f"{value:.2f}x"
    if key in ("params_total", "tokens_per_sec", "index"):
        return f"{value:,.0f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the main columns, one line per trial."""
    select = rows[0]["select_metric"] if rows else "ndcg@10"
    columns = [("#", "index"), ("overrides", "overrides"), ("status", "status"), ("params", "params_total"),
               ("ratio", "compression_ratio"), (f"best val/{select}", "best_val"),
               *((f"test/{m}", f"test_{m}") for m in TABLE_TEST), ("tokens/s", "tokens_per_sec")]
    cells = [[name for name, _ in columns]] + [[_cell(r.get(key), key) for _, key in columns] for r in rows]
    lines = _aligned(cells, left=(1, 2))
    failed = [f"  {r['trial']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(lines + (["failed:"] + failed if failed else []))


def over_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of the best validation value and every test metric over the
    finished trials that differ only in their seed; one row per setting with two or more seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "finished" and f"set.{SEED_KEY}" in r:
            key = tuple((k[4:], v) for k, v in r.items() if k.startswith("set.") and k != f"set.{SEED_KEY}")
            groups.setdefault(key, []).append(r)
    out = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        row = {"overrides": " ".join(f"{k}={v}" for k, v in key) or "(the config)",
               "seeds": " ".join(str(m[f"set.{SEED_KEY}"]) for m in members)}
        metrics = ["best_val"] + [k for k in members[0] if k.startswith("test_")]
        for m in metrics:
            values = [float(x[m]) for x in members if m in x]
            mean = sum(values) / len(values)
            row[f"{m}_mean"] = mean
            row[f"{m}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        out.append(row)
    return out


def format_seeds_table(rows: Sequence[dict[str, Any]], select: str) -> str:
    """Mean ± standard deviation per setting (the over_seeds rows)."""
    columns = [("overrides", "overrides"), ("seeds", "seeds"), (f"best val/{select}", "best_val"),
               *((f"test/{m}", f"test_{m}") for m in SEEDS_TEST)]
    cells = [[name for name, _ in columns]] + [
        [r[key] if key in ("overrides", "seeds") else
         (f"{r[key + '_mean']:.4f} ± {r[key + '_std']:.4f}" if key + "_mean" in r else "-") for _, key in columns]
        for r in rows]
    return "\n".join(_aligned(cells, left=(0, 1)))


def _aligned(cells: Sequence[Sequence[str]], left: tuple[int, ...]) -> list[str]:
    """Text lines of a table whose first row is the header: columns padded to their widest cell,
    the `left` ones left-aligned, the rest right-aligned, a dashed rule under the header."""
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # union of columns, first-seen order
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                         for r in rows)


def summarize(sweep_dir: str | pathlib.Path, out=print) -> list[dict[str, Any]]:
    """Prints the table of a sweep's trials and writes `<sweep_dir>/summary.csv`; returns the rows."""
    root = pathlib.Path(sweep_dir)
    if not root.is_dir():
        raise CprecError(f"{root} is not a directory; pass a sweep directory such as runs/cprec-ml100k")
    records = _trials(root)
    if not records:
        raise CprecError(f"{root} holds no sweep trials (no sweep.json and no */trial.json); launch one with --sweep")
    rows = [trial_row(root, r) for r in records]
    path = root / "summary.csv"
    _write_csv(path, rows)
    out(format_table(rows))
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    out(f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; wrote {path}")
    seeded = over_seeds(rows)
    if seeded:
        _write_csv(root / "seeds.csv", seeded)
        out(f"\nover seeds (finished trials only; mean ± sample standard deviation):\n"
            + format_seeds_table(seeded, rows[0]["select_metric"]) + f"\nwrote {root / 'seeds.csv'}")
    return rows
