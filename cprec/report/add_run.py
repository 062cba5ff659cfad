"""`python -m cprec.report add RUN --table NAME`: a finished run's results.json as a row of a table."""
from __future__ import annotations

import datetime
import json
import pathlib
import statistics

from cprec.report.paths import RESULTS
from cprec.report.table import ResultFileError, dump_table


def run_values(run: pathlib.Path) -> dict:
    """results.json flattened to the keys tables use: `test/mrr@5`, `params/total`, `step`, ..., and
    the popularity baseline's test metrics the run logged (`popularity/test_mrr@10`, ...)."""
    path = run / "results.json"
    if not path.exists():
        raise ResultFileError(f"{path}: no results.json (the run has not finished)")
    res = json.loads(path.read_text())
    flat = {"step": res.get("step")} | dict(res.get("report", {}))
    if "wall_s" in res:  # start to end of the run's last attempt, data preparation and compiling included
        flat["wall_s"] = res["wall_s"]
    flat |= {f"test/{k}": v for k, v in res.get("test", {}).items()}
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        selected = next((x["test/selected_step"] for x in reversed(lines) if "test/selected_step" in x), None)
        for line in lines:
            flat |= {k: v for k, v in line.items() if k.startswith("popularity/")}
            flat |= {k: v for k, v in line.items() if k.startswith("serve/")}  # top-n latency after training
            if "train/tokens_per_sec" in line:  # the average since the first compiled step: keep the last
                flat["train_tokens_s"] = line["train/tokens_per_sec"]
            if line["step"] == selected:  # the validation metrics of the parameters that were tested
                flat |= {k: v for k, v in line.items() if k.startswith("val/")}
    return flat


def sweep_values(sweep: pathlib.Path) -> tuple[dict, list[pathlib.Path]]:
    """The mean of every number over a sweep's finished trials (its seeds), with `<key>_std` (sample
    standard deviation) beside each, and `seeds`; and the trials' results.json files."""
    files = sorted(sweep.glob("*/results.json"))
    if len(files) < 2:
        raise ResultFileError(f"{sweep}: {len(files)} finished trial(s); a mean over seeds needs 2 or more")
    values = [run_values(f.parent) for f in files]
    flat: dict = {"seeds": " ".join(str(json.loads((f.parent / "config.json").read_text()).get("seed")) for f in files)}
    for key in values[0]:
        column = [v.get(key) for v in values]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in column):
            flat[key] = column[0] if len(set(column)) == 1 else statistics.fmean(column)  # counts stay ints
            flat[f"{key}_std"] = statistics.stdev(column)
    return flat, files


def add_run(run: str | pathlib.Path, table: str, sets: dict[str, str], results: pathlib.Path = RESULTS) -> dict:
    """Adds (or replaces, matched on the first column) the run's row; returns the row.

    ``run``: a run directory (or its results.json), or a sweep directory whose trials are seeds of
    one setting: then the row holds their means, with `<key>_std` for a `keys` column's spread.
    """
    run = pathlib.Path(run)
    if run.name == "results.json":  # the file itself, as well as its run directory
        run = run.parent
    path = results / f"{table}.json"
    spec = json.loads(path.read_text())
    if "rows_from" in spec:
        raise ResultFileError(f"{path}: its rows come from {spec['rows_from']}; copy the new file there instead")
    if (run / "results.json").exists():
        flat, files = run_values(run), [run / "results.json"]
    else:
        flat, files = sweep_values(run)
    flat |= sets
    keys = [k for c in spec["columns"] for k in (c["keys"] if "keys" in c else [c["key"]])]
    row = {k: flat[k] for k in keys if k in flat}
    mtime = max(f.stat().st_mtime for f in files)
    row["_source"] = f"{run}/results.json" if len(files) == 1 else f"{run}/*/results.json ({len(files)} trials)"
    row["_date"] = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).date().isoformat()
    first = spec["columns"][0]["key"]
    spec["rows"] = [r for r in spec["rows"] if r.get(first) != row.get(first)] + [row]
    path.write_text(dump_table(spec))
    return row
