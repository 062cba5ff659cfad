"""`python -m cprec.report rivals SWEEP_DIR... --table NAME`: the rivals grid (experiments/rivals.py) as one table.

Each finished trial of the sweeps is recorded in results/trials/NAME.jsonl (committed, so trials run
in different sessions or on different machines add up; a rerun of a setting replaces its record),
and the table is rendered from every record. For each (method, budget): the learning rate whose seed-0 run has the
best validation NDCG@10 among the rates every method at that budget has tried (the tuning rule every
method gets; test metrics never choose; a rate not yet tried by all is shown in parentheses), then the
mean and sample standard deviation over that rate's seeds of the test metrics, and the parameters,
training speed and top-20 latency; the stored bytes of the seed-0 run's selected parameters in
float32 and as an int8 export (row-wise 8-bit item tables, ``cprec.serve.quantize``; a pruned table
stored as its non-zeros, ``cprec.serve.sparse``), and the int8 export's test metrics (mean over the
seeds whose runs were on disk when recorded).
"""
from __future__ import annotations

import json
import pathlib
import statistics
from collections import defaultdict

from cprec.report.add_run import run_values
from cprec.report.paths import RESULTS
from cprec.report.table import ResultFileError, dump_table

METHOD_NAMES = {"blockwise": "CpRec", "mde": "MDE", "lowrank": "low-rank", "hash": "hashing", "qr": "QR",
                "tt": "TT-Rec", "jpq": "RecJPQ", "prune": "pruning", "full": "uncompressed"}
BACKBONE_NAMES = {"nextitnet": "NextItNet", "sasrec": "SASRec"}
METRICS = ("test/mrr@5", "test/ndcg@10", "test/hr@10")
INT8 = tuple(f"int8/{k}" for k in METRICS)  # the int8 export's test metrics
STORED = ("bytes_float32", "bytes_int8", *INT8)  # what ``stored`` measures
# The export's storage scheme that ``stored`` measured; raised whenever an artifact's layout changes
# (2: TT-Rec's 3-D and 4-D cores quantised in int8), so that re-recording measures every run on disk again.
STORED_FORMAT = 2
SELECT = "val/ndcg@10"
RECORDED = (*METRICS, *INT8, "params/total", "params/compression_ratio", "train_tokens_s", "serve/top20_ms_batch1",
            "serve/top20_ms_batch256")
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
    {"key": "int8/test/mrr@5", "label": "int8 MRR@5", "format": "{:.4f}"},
    {"key": "train_tokens_s", "label": "train tokens/s", "format": "{:,.0f}"},
    {"keys": ["serve/top20_ms_batch1", "serve/top20_ms_batch256"], "label": "top-20 ms (batch 1 / 256)",
     "format": "{:.2f}", "sep": " / "},
    {"key": "seeds", "label": "seeds"},
]


def method_label(embedding: str, backbone: str) -> str:
    """A method's name in the tables: "QR", "QR / SASRec", "SASRec (uncompressed)"."""
    name = BACKBONE_NAMES.get(backbone, backbone)
    if embedding == "full":
        return f"{name} (uncompressed)"
    method = METHOD_NAMES.get(embedding, embedding)
    return method if backbone == "nextitnet" else f"{method} / {name}"


def trial_record(run: pathlib.Path) -> dict:
    """A finished trial as one JSON-able record: its setting (method, backbone, budget, lr, seed) and
    the numbers its results.json and metrics hold (``stored`` adds what needs its parameters)."""
    config = json.loads((run / "config.json").read_text())
    m = config["model"]
    size = config.get("budget", {})
    if "options" in size:
        chosen = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in sorted(size["options"].items()) if k != "qr_op")
    elif size:
        chosen = "ranks " + "/".join(map(str, size["ranks"]))
    else:
        chosen = ""
    backbone = m.get("backbone", "nextitnet")
    method = method_label(m["embedding"], backbone)
    values = run_values(run)
    record = {"trial": run.name, "method": method, "backbone": backbone, "budget": str(m.get("budget") or "none"),
              "lr": config["optim"]["lr"], "seed": config["seed"], "size": chosen,
              **{k: values[k] for k in (*RECORDED, SELECT) if k in values}}
    return record


def _selection_score(runs: list[dict]) -> float:
    """Validation NDCG@10 of a learning rate: its seed-0 run's (the grid's), so that seeds added at the
    chosen rate cannot change the choice; the mean over its seeds where it has no seed 0."""
    grid = [r for r in runs if r["seed"] == 0] or runs
    return statistics.fmean(r.get(SELECT, float("-inf")) for r in grid)


def stored(run: pathlib.Path, earlier: dict | None = None) -> dict:
    """The stored bytes of the run's selected parameters as ``python -m cprec.export`` writes them in
    float32 and int8 (item tables row-wise 8-bit; a pruned table as its non-zeros in both), and the
    int8 artifact's test metrics (the same users and ranking as the run's own test). ``earlier``: this
    run's measurement under an older storage format, whose int8 metrics are kept if the bytes are
    the same (the export's layout did not change for this model: its int8 parameters are the same)."""
    import jax  # the parameters' work only: the records and rows need neither jax nor the model
    import numpy as np

    from cprec.eval.evaluate import eval_splits, evaluate_split, make_rank_fn
    from cprec.eval.pretrained import load_run
    from cprec.serve.artifact import stored_params
    from cprec.serve.quantize import dequantize_tree

    run_ = load_run(run)
    params = jax.tree.map(np.asarray, run_.params)
    out = {"bytes_float32": stored_params(params, "float32")[0]}
    out["bytes_int8"], int8 = stored_params(params, "int8")
    if earlier and all(earlier.get(k) == out[k] for k in out):
        return {**earlier, **out}
    inputs, targets = eval_splits(run_.data, run_.config.eval.num_users)["test"]
    metrics = evaluate_split(make_rank_fn(run_.model), dequantize_tree(int8), inputs, targets,
                             run_.config.eval.batch_size, run_.config.eval.ks, split="test (int8)")
    return out | {f"int8/{k}": metrics[k.split("/")[1]] for k in METRICS}


def rival_rows(records: list[dict]) -> list[dict]:
    """One row per (method, budget): the validation-chosen learning rate's seeds, averaged."""
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for t in records:
        groups[(t["method"], t["budget"])][t["lr"]].append(t)
    # Equal tuning effort while trials accumulate: at each budget, only the rates that every method
    # there has tried can be chosen (a method's other rates are shown in parentheses, not used), so
    # no method gets an extra rate before the others; no common rate: each group's own rates. Each
    # backbone is its own comparison.
    backbone = {key: next(iter(by_lr.values()))[0].get("backbone", "nextitnet") for key, by_lr in groups.items()}
    common: dict[tuple[str, str], set[float]] = {}
    for (method, budget), by_lr in groups.items():
        at = (backbone[method, budget], budget)
        common[at] = common.get(at, set(by_lr)) & set(by_lr)
    rows = []
    for (method, budget), by_lr in groups.items():
        eligible = {lr: runs for lr, runs in by_lr.items() if lr in common[backbone[method, budget], budget]} or by_lr
        lr, runs = max(eligible.items(), key=lambda kv: _selection_score(kv[1]))
        runs = sorted(runs, key=lambda r: r["seed"])
        pending = sorted(set(by_lr) - set(eligible))
        tried = ", ".join(f"{x:g}" for x in sorted(eligible)) + (
            f" (+{', '.join(f'{x:g}' for x in pending)})" if pending else "")
        row = {"method": method, "backbone": backbone[method, budget], "budget": budget, "lr": lr, "size": runs[0]["size"],
               "seeds": " ".join(str(r["seed"]) for r in runs), "lrs_tried": tried}
        for key in (*RECORDED, SELECT):
            column = [r[key] for r in runs if key in r]
            if column:
                row[key] = statistics.fmean(column)
                if key in METRICS + INT8 and len(column) > 1:
                    row[f"{key}_std"] = statistics.stdev(column)
        row["params/total"] = int(row["params/total"])
        for key in ("bytes_float32", "bytes_int8"):  # the seed-0 run's (seeds share a size)
            if key in runs[0]:
                row[key] = runs[0][key]
        row["_source"] = ", ".join(r["trial"] for r in runs)
        rows.append(row)
    order = [*METHOD_NAMES.values(), *(f"{b} (uncompressed)" for b in BACKBONE_NAMES.values())]
    rank = lambda name: order.index(name.split(" / ")[0]) if name.split(" / ")[0] in order else len(order)
    # NextItNet's rows, then SASRec's
    return sorted(rows, key=lambda r: (r["backbone"] != "nextitnet", rank(r["method"]), -r["params/total"]))


def load_records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def update_records(sweeps: list[pathlib.Path], path: pathlib.Path, with_bytes: bool = True) -> list[dict]:
    """The records in ``path`` with the sweeps' finished trials added; a trial of the same setting
    (method, budget, lr, seed) replaces the earlier one. Writes ``path`` and returns the records."""
    key = lambda r: (r["method"], r["budget"], r["lr"], r["seed"])
    records = {key(r): r for r in load_records(path)}
    for sweep in sweeps:
        for f in sorted(pathlib.Path(sweep).glob("*/results.json")):
            record = trial_record(f.parent)
            old = records.get(key(record), {})
            if with_bytes:  # the stored bytes and the int8 test cost an evaluation: kept from the same run's record
                kept = {k: old[k] for k in STORED if k in old}
                same = (old.get("trial") == record["trial"] and len(kept) == len(STORED)
                        and all(old.get(k) == record.get(k) for k in METRICS))
                if same and old.get("stored_format", 1) == STORED_FORMAT:
                    record |= kept
                else:
                    record |= stored(f.parent, kept if same else None)
                record["stored_format"] = STORED_FORMAT
            records[key(record)] = record
            print(f"recorded {record['method']} {record['budget']} lr={record['lr']:g} seed={record['seed']} "
                  f"({f.parent})", flush=True)
    out = sorted(records.values(), key=lambda r: (r["method"], r["budget"], r["lr"], r["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in out))
    return out


def write_rivals_table(sweeps: list[pathlib.Path], table: str, title: str, command: str, machine: str,
                       results: pathlib.Path = RESULTS) -> dict:
    """Adds the sweeps' finished trials to results/trials/TABLE.jsonl, then (re)writes results/TABLE.json
    from every recorded trial; returns the table's spec. With no sweeps it only re-renders."""
    records = update_records(sweeps, results / "trials" / f"{table}.jsonl")
    if not records:
        raise ResultFileError(f"results/trials/{table}.jsonl: no recorded trial; name a sweep directory")
    rows = rival_rows(records)
    seeds = sorted({int(s) for r in rows for s in r["seeds"].split()})
    spec = {"title": title, "command": command, "machine": machine, "seeds": seeds,
            "source": f"python -m cprec.report rivals SWEEP_DIR... --table {table} (from results/trials/{table}.jsonl)",
            "notes": "lr chosen per (method, budget) on validation NDCG@10 of its seed-0 run over the lrs in "
                     "lrs_tried; bytes are those of the seed-0 run's selected parameters",
            "columns": COLUMNS, "rows": rows}
    (results / f"{table}.json").write_text(dump_table(spec))
    return spec
