"""`python -m cprec.report add RUN --table NAME`: a finished run's results.json as a row of a table."""
from __future__ import annotations

import datetime
import json
import pathlib

from cprec.report.paths import RESULTS
from cprec.report.table import ResultFileError, dump_table


def run_values(run: pathlib.Path) -> dict:
    """results.json flattened to the keys tables use: `test/mrr@5`, `params/total`, `step`, ..."""
    path = run / "results.json"
    if not path.exists():
        raise ResultFileError(f"{path}: no results.json (the run has not finished)")
    res = json.loads(path.read_text())
    flat = {"step": res.get("step")} | dict(res.get("report", {}))
    flat |= {f"test/{k}": v for k, v in res.get("test", {}).items()}
    return flat


def add_run(run: str | pathlib.Path, table: str, sets: dict[str, str], results: pathlib.Path = RESULTS) -> dict:
    """Adds (or replaces, matched on the first column) the run's row; returns the row."""
    run = pathlib.Path(run)
    if run.name == "results.json":  # the file itself, as well as its run directory
        run = run.parent
    path = results / f"{table}.json"
    spec = json.loads(path.read_text())
    if "rows_from" in spec:
        raise ResultFileError(f"{path}: its rows come from {spec['rows_from']}; copy the new file there instead")
    flat = run_values(run) | sets
    keys = [k for c in spec["columns"] for k in (c["keys"] if "keys" in c else [c["key"]])]
    row = {k: flat[k] for k in keys if k in flat}
    mtime = (run / "results.json").stat().st_mtime
    row["_source"] = f"{run}/results.json"
    row["_date"] = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).date().isoformat()
    first = spec["columns"][0]["key"]
    spec["rows"] = [r for r in spec["rows"] if r.get(first) != row.get(first)] + [row]
    path.write_text(dump_table(spec))
    return row
