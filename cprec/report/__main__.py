"""Re-renders every docs table and plot from results/, checks them, or adds a run's row.

    python -m cprec.report                 # render the tables in README.md, docs/*.md and the plots in docs/img/
    python -m cprec.report --check         # exit 1 naming each file whose tables differ from results/
    python -m cprec.report add RUN --table NAME --set run=my-run --set command="experiments/cprec.py"
    python -m cprec.report rivals runs/rivals-synthetic30k --table rivals-synthetic30k   # the rivals grid
"""
from __future__ import annotations

import argparse
import sys

from cprec.errors import exit_on_user_error
from cprec.report.add_run import add_run
from cprec.report.markers import render_docs
from cprec.report.table import tidy_results


def main(argv: list[str] | None = None) -> int:
    with exit_on_user_error():  # a missing or malformed result file: one line naming it, exit status 2
        return _main(sys.argv[1:] if argv is None else argv)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["add"]:
        p = argparse.ArgumentParser(prog="python -m cprec.report add")
        p.add_argument("run", help="a finished run directory, or its results.json")
        p.add_argument("--table", required=True, help="results/NAME.json to add the row to")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a cell results.json does not hold (the row's label, its command)")
        a = p.parse_args(argv[1:])
        sets = dict(s.split("=", 1) for s in a.set)
        print(add_run(a.run, a.table, sets))
        argv = []
    elif argv[:1] == ["rivals"]:
        from cprec.report.rivals import write_rivals_table
        p = argparse.ArgumentParser(prog="python -m cprec.report rivals")
        p.add_argument("sweeps", nargs="*", help="sweep directories of experiments/rivals.py whose finished trials to record (none: re-render from results/trials/)")
        p.add_argument("--table", required=True, help="results/NAME.json to (re)write")
        p.add_argument("--title", default="Compression methods at equal budgets")
        p.add_argument("--command", default="python run.py --config experiments/rivals.py:DATASET --sweep "
                                            "--launcher local --sweep_dir runs/rivals-DATASET")
        p.add_argument("--machine", default="2-core CPU, shared")
        a = p.parse_args(argv[1:])
        spec = write_rivals_table(a.sweeps, a.table, a.title, a.command, a.machine)
        print(f"wrote results/{a.table}.json: {len(spec['rows'])} rows")
        argv = []
    p = argparse.ArgumentParser(prog="python -m cprec.report")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    a = p.parse_args(argv)
    if not a.check:
        for path in tidy_results():
            print(f"reformatted: {path}")
    changed = render_docs(check=a.check)
    for path in changed:
        print(f"{'differs' if a.check else 'rendered'}: {path}")
    if a.check:
        return 1 if changed else 0
    if not a.no_plots:
        from cprec.report.plots import render_plots  # matplotlib only where plots are drawn
        for path in render_plots():
            print(f"plotted: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
