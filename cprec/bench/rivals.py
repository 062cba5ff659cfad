"""Training speed of every compression method of experiments/rivals.py, measured side by side.

  python -m cprec.bench.rivals                                   # synthetic30k, 20x, NextItNet
  python -m cprec.bench.rivals --config experiments/rivals.py:synthetic30k,budget=20x,backbone=sasrec
  python -m cprec.bench.rivals --methods cprec,qr --table bench-rivals-speed-synthetic30k

The rivals table's "train tokens/s" is each run's own figure, measured while other jobs shared the
machine, in different sessions. This bench gives the ratios under one condition: every method
(and the uncompressed baseline) is built from its experiments/rivals.py config at one budget on
the dataset's item counts, with the run's own jitted train step (its optimizer, micro-batches,
sampler and pruning), and one step of each is timed in turn, round after round
(``interleaved_median_seconds``), so a slow spell of a shared machine falls on every method alike.
Batches are i.i.d. draws from the items' training popularity (``cprec.bench.optimizer.zipf_windows``),
so no method's cost depends on which windows it happens to get. Prints and saves median tokens/s
per method and each one's speed relative to CpRec's; ``--table`` also writes results/NAME.json
for the docs.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from cprec.bench.common import RESULTS_DIR, finish, load_average
from cprec.bench.optimizer import zipf_windows
from cprec.config import load_config_file, validate_config
from cprec.data.dataset import load_dataset
from cprec.model.builder import build_model, param_report, uncompressed_config
from cprec.report.paths import RESULTS
from cprec.report.rivals import method_label
from cprec.report.table import dump_table
from cprec.timing import interleaved_median_seconds
from cprec.train.loop import make_training
from cprec.train.micro_batch import num_micro_batches
from cprec.train.step import loss_capacities

COLUMNS = [
    {"key": "method", "label": "method"},
    {"key": "params", "label": "params", "format": "{:,}"},
    {"key": "output", "label": "output layer"},
    {"key": "step_ms", "label": "step ms (median)", "format": "{:.1f}"},
    {"key": "tokens_s", "label": "train tokens/s", "format": "{:,.0f}"},
    {"key": "vs_cprec", "label": "vs CpRec", "format": "{:.2f}x"},
]


METHODS = "cprec,mde,lowrank,hash,qr,tt,jpq,prune,nextitnet"  # experiments/rivals.py's, the baseline last


def build(config, counts: np.ndarray, batch) -> tuple[Callable[[], object], dict]:
    """(one training step, facts) of one method: the model, state and jitted step a run would train."""
    model = build_model(config, counts, loss_capacities(config, counts, 1))
    micro = num_micro_batches(config, 1, num_items=len(counts))
    state, step = make_training(config, model, counts, int(config.train.num_steps or 1000), micro)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    report = param_report(model, build_model(uncompressed_config(config), counts))
    # params: a pruned table's non-zeros, as the budget counts them
    facts = {"method": method_label(config.model.embedding, config.model.backbone), "params": report["params/total"],
             "micro_batches": micro, "output": config.model.softmax}
    return one_step, facts


def run(args: argparse.Namespace) -> dict:
    configs = {}
    for m in args.methods.split(","):
        c = load_config_file(f"{args.config},method={m}")
        validate_config(c)
        configs[m] = c
    first = next(iter(configs.values()))
    data = load_dataset(first.data, verbose=False)
    counts = np.asarray(data.item_counts, np.float64)
    counts[0] = 0  # the padding id is never an input
    batch = zipf_windows(counts, first.train.batch_size, first.data.max_len + 1, args.seed)
    steps, rows = {}, {}
    for m, c in configs.items():
        t0 = time.perf_counter()
        steps[m], rows[m] = build(c, data.item_counts, batch)
        print(f"{rows[m]['method']:>26}: {rows[m]['params']:,} params, built in {time.perf_counter() - t0:.0f} s",
              flush=True)
    t0 = time.perf_counter()
    seconds = interleaved_median_seconds(steps, repeats=args.repeats, warmup=1)  # warm-up compiles
    print(f"timed {args.repeats} rounds in {time.perf_counter() - t0:.0f} s (compilation included)", flush=True)
    tokens = int(batch.shape[0]) * (int(batch.shape[1]) - 1)
    ref = seconds.get("cprec")
    for m, s in seconds.items():
        rows[m] |= {"step_ms": 1e3 * s, "tokens_s": tokens / s, **({"vs_cprec": ref / s} if ref else {})}
        print(f"{rows[m]['method']:>26}: {1e3 * s:8.1f} ms/step  {tokens / s:10,.0f} tokens/s"
              + (f"  {ref / s:.2f}x CpRec's speed" if ref else ""), flush=True)
    return {"config": args.config, "repeats": args.repeats, "batch": list(map(int, batch.shape)),
            "rows": list(rows.values())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/rivals.py:synthetic30k,budget=20x",
                   help="the protocol's config with its dataset, budget and backbone; ,method=M is appended")
    p.add_argument("--methods", default=METHODS, help=f"comma-separated (default: {METHODS})")
    p.add_argument("--repeats", type=int, default=7, help="rounds of one step per method (medians)")
    p.add_argument("--seed", type=int, default=0, help="of the batch's draws")
    p.add_argument("--out", default=str(RESULTS_DIR / "rivals-speed.json"))
    p.add_argument("--table", default="", help="also write results/NAME.json (a docs table)")
    p.add_argument("--machine", default="2-core CPU, shared")
    args = p.parse_args(argv)
    load_start = load_average()
    res = run(args)
    res = finish(res, args.out, load_start)
    if args.table:
        spec = {"title": f"One training step of each method, interleaved ({args.config})",
                "command": res["command"], "machine": args.machine,
                "source": f"python -m cprec.bench.rivals --table {args.table} (its JSON: {args.out})",
                "notes": f"batch {res['batch'][0]} x {res['batch'][1] - 1}; medians of {args.repeats} rounds; "
                         f"load average {res['load_average_start']:.1f} at the start, {res['load_average_end']:.1f} at the end",
                "columns": COLUMNS, "rows": res["rows"]}
        (RESULTS / f"{args.table}.json").write_text(dump_table(spec))
        print(f"wrote results/{args.table}.json")
    return res


if __name__ == "__main__":
    main()
