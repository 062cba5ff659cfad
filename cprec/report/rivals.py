"""`python -m cprec.report rivals SWEEP_DIR... --table NAME`: the rivals grid (experiments/rivals.py) as one table.

For each (method, budget) of the sweeps' finished trials: the learning rate whose seed-0 run has the
best validation NDCG@10 (the tuning rule every method gets; test metrics never choose), then the
mean and sample standard deviation over that rate's seeds of the test metrics, and the parameters,
training speed and top-20 latency; the stored bytes of the seed-0 run's selected parameters in
float32 and as an int8 export (row-wise 8-bit item tables, ``cprec.serve.quantize``).
"""
from __future__ import annotations

import json
import pathlib
import statistics
from collections import defaultdict

import jax
import numpy as np

from cprec.report.add_run import run_values
from cprec.report.paths import RESULTS
from cprec.report.table import ResultFileError, dump_table

METHOD_NAMES = {"blockwise": "CpRec", "mde": "MDE", "lowrank": "low-rank", "hash": "hashing", "qr": "QR",
                "tt": "TT-Rec", "full": "NextItNet (uncompressed)"}
METRICS = ("test/mrr@5", "test/ndcg@10", "test/hr@10")
SELECT = "val/ndcg@10"
COLUMNS = [
    {"key": "method", "label": "method"},
    {"key": "budget", "label": "budget"},
    {"key": "params/total", "label": "params", "format": "{:,}"},
    {"key": "params/compression_ratio", "label": "ratio", "format": "{:.1f}x"},
    {"key": "size", "label": "size chosen"},
    {"key": "lr", "label": "lr"},
    {"key": "lrs_tried", "label": "lrs tried"},
    {"keys": ["test/mrr@5", "test/mrr@5_std"], "label": "MRR@5", "format": "{:.4f}", "sep": " ± "},
    {"keys": ["test/ndcg@10", "test/ndcg@10_std"], "label": "NDCG@10", "format": "{:.4f}", "sep": " ± "},
    {"keys": ["test/hr@10", "test/hr@10_std"], "label": "HR@10", "format": "{:.4f}", "sep": " ± "},
    {"keys": ["bytes_float32", "bytes_int8"], "label": "stored bytes (float32 / int8)", "format": "{:,}", "sep": " / "},
    {"key": "train_tokens_s", "label": "train tokens/s", "format": "{:,.0f}"},
    {"keys": ["serve/top20_ms_batch1", "serve/top20_ms_batch256"], "label": "top-20 ms (batch 1 / 256)",
     "format": "{:.2f}", "sep": " / "},
    {"key": "seeds", "label": "seeds"},
]


def _trial(run: pathlib.Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    m = config["model"]
    values = run_values(run)
    size = config.get("budget", {})
    if "options" in size:
        chosen = ", ".join(f"{k} {v}" for k, v in sorted(size["options"].items()) if k != "qr_op")
    elif size:
        chosen = "ranks " + "/".join(map(str, size["ranks"]))
    else:
        chosen = ""
    return {**values, "run": run, "method": METHOD_NAMES.get(m["embedding"], m["embedding"]),
            "budget": str(m.get("budget") or "none"), "lr": config["optim"]["lr"], "seed": config["seed"],
            "size": chosen}


def _selection_score(runs: list[dict]) -> float:
    """Validation NDCG@10 of a learning rate: its seed-0 run's (the grid's), so that seeds added at the
    chosen rate cannot change the choice; the mean over its seeds where it has no seed 0."""
    grid = [r for r in runs if r["seed"] == 0] or runs
    return statistics.fmean(r.get(SELECT, float("-inf")) for r in grid)


def stored_bytes(run: pathlib.Path) -> tuple[int, int]:
    """(float32, int8) bytes of the run's selected parameters, as ``python -m cprec.export`` stores them."""
    from cprec.eval.pretrained import load_run
    from cprec.serve.quantize import quantize_params

    params = jax.tree.map(np.asarray, load_run(run).params)
    size = lambda tree: int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
    return size(params), size(quantize_params(params))


def rival_rows(sweeps: list[pathlib.Path], with_bytes: bool = True) -> list[dict]:
    """One row per (method, budget): the validation-chosen learning rate's seeds, averaged."""
    trials = [_trial(f.parent) for s in sweeps for f in sorted(pathlib.Path(s).glob("*/results.json"))]
    if not trials:
        raise ResultFileError(f"{', '.join(map(str, sweeps))}: no finished trial")
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        groups[(t["method"], t["budget"])][t["lr"]].append(t)
    rows = []
    for (method, budget), by_lr in groups.items():
        lr, runs = max(by_lr.items(), key=lambda kv: _selection_score(kv[1]))
        runs = sorted(runs, key=lambda r: r["seed"])
        row = {"method": method, "budget": budget, "lr": lr, "size": runs[0]["size"],
               "seeds": " ".join(str(r["seed"]) for r in runs), "lrs_tried": ", ".join(f"{x:g}" for x in sorted(by_lr))}
        for key in (*METRICS, "params/total", "params/compression_ratio", "train_tokens_s",
                    "serve/top20_ms_batch1", "serve/top20_ms_batch256", SELECT):
            column = [r[key] for r in runs if key in r]
            if column:
                row[key] = statistics.fmean(column)
                if key in METRICS and len(column) > 1:
                    row[f"{key}_std"] = statistics.stdev(column)
        row["params/total"] = int(row["params/total"])
        if with_bytes:
            row["bytes_float32"], row["bytes_int8"] = stored_bytes(runs[0]["run"])
        row["_source"] = ", ".join(str(r["run"]) for r in runs)
        rows.append(row)
    order = list(METHOD_NAMES.values())
    return sorted(rows, key=lambda r: (order.index(r["method"]) if r["method"] in order else 99, -r["params/total"]))


def write_rivals_table(sweeps: list[pathlib.Path], table: str, title: str, command: str, machine: str,
                       results: pathlib.Path = RESULTS) -> dict:
    """Writes results/TABLE.json from the sweeps (replacing its rows); returns the spec."""
    rows = rival_rows(sweeps)
    seeds = sorted({int(s) for r in rows for s in r["seeds"].split()})
    spec = {"title": title, "command": command, "machine": machine, "seeds": seeds,
            "source": "python -m cprec.report rivals " + " ".join(map(str, sweeps)) + f" --table {table}",
            "notes": "lr chosen per (method, budget) on mean validation NDCG@10 over the lrs in lrs_tried; "
                     "bytes are those of the seed-0 run's selected parameters",
            "columns": COLUMNS, "rows": rows}
    (results / f"{table}.json").write_text(dump_table(spec))
    return spec
