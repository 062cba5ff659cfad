"""Training speed of every compression method of experiments/rivals.py, measured side by side.

  python -m cprec.bench.rivals                                   # synthetic30k, 20x, NextItNet
  python -m cprec.bench.rivals --config experiments/rivals.py:synthetic30k,budget=20x,backbone=sasrec
  python -m cprec.bench.rivals --methods cprec,qr --table bench-rivals-speed-synthetic30k
  python -m cprec.bench.rivals --variant "full softmax=experiments/nextitnet.py:synthetic30k" \
      --variant "sampled 2,048=experiments/nextitnet.py:synthetic30k,softmax=sampled model.num_negatives=2048"

The rivals table's "train tokens/s" is each run's own figure, measured while other jobs shared the
machine, in different sessions. This bench gives the ratios under one condition: every method
(and the uncompressed baseline) is built from its experiments/rivals.py config at one budget on
the dataset's item counts, with the run's own jitted train step (its optimizer, micro-batches,
sampler and pruning), and one step of each is timed in turn, round after round
(``interleaved_median_seconds``), so a slow spell of a shared machine falls on every method alike.
Batches are i.i.d. draws from the items' training popularity (``cprec.bench.optimizer.zipf_windows``),
so no method's cost depends on which windows it happens to get. Prints and saves median tokens/s
per method and each one's speed relative to CpRec's (or ``--reference``'s); ``--table`` also writes results/NAME.json
for the docs.

``--variant "LABEL=CONFIG [key=value ...]"`` (repeated) times any configs instead of the protocol's
methods: a config file spec with optional dotted overrides, e.g. one model's softmax settings side
by side. Every variant must train on the same dataset; speeds are relative to ``--reference``
(default: CpRec among methods, the first variant among variants).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from cprec.bench.common import RESULTS_DIR, finish, load_average
from cprec.bench.optimizer import zipf_windows
from cprec.config import ConfigError, check_override_keys, convert_value, load_config_file, validate_config
from cprec.data.dataset import load_dataset
from cprec.errors import exit_on_user_error
from cprec.model.builder import build_model, param_report, uncompressed_config
from cprec.report.paths import RESULTS
from cprec.report.rivals import method_label
from cprec.report.table import dump_table
from cprec.sweep.expand import apply_overrides, shared_overrides
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
    {"key": "vs_reference", "label": "vs REFERENCE", "format": "{:.2f}x"},
]


METHODS = "cprec,mde,lowrank,hash,qr,tt,jpq,prune,nextitnet"  # experiments/rivals.py's, the baseline last


def variant_config(text: str) -> tuple[str, object]:
    """(label, config) of ``--variant "LABEL=path.py[:arg] [key=value ...]"``."""
    label, sep, rest = text.partition("=")
    spec, *pairs = rest.split() or [""]
    if not sep or not label.strip() or not spec:
        raise ConfigError(f"--variant {text!r} is malformed; write \"LABEL=experiments/FILE.py[:arg] [key=value ...]\"")
    config = load_config_file(spec)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--variant {label!r}: override {pair!r} has no '='; write model.key=value")
        check_override_keys(config, [key])
        default = shared_overrides(config, [key])[key]
        apply_overrides(config, {key: convert_value(key, value, default)}, where=f"--variant {label!r}")
    return label.strip(), config


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
    if args.variant:
        configs = dict(variant_config(v) for v in args.variant)
        reference = args.reference or next(iter(configs))
    else:
        configs = {m: load_config_file(f"{args.config},method={m}") for m in args.methods.split(",")}
        reference = args.reference or "cprec"
    for c in configs.values():
        validate_config(c)
    first = next(iter(configs.values()))
    if any(c.data.name != first.data.name for c in configs.values()):
        raise ConfigError("every --variant must train on the same dataset (one batch is timed for all)")
    if args.reference and reference not in configs:
        raise ConfigError(f"--reference {reference!r} is none of the timed ones: {', '.join(configs)}")
    data = load_dataset(first.data, verbose=False)
    counts = np.asarray(data.item_counts, np.float64)
    counts[0] = 0  # the padding id is never an input
    batch = zipf_windows(counts, first.train.batch_size, first.data.max_len + 1, args.seed)
    steps, rows = {}, {}
    for m, c in configs.items():
        t0 = time.perf_counter()
        steps[m], rows[m] = build(c, data.item_counts, batch)
        if args.variant:
            rows[m]["method"] = m
        print(f"{rows[m]['method']:>26}: {rows[m]['params']:,} params, built in {time.perf_counter() - t0:.0f} s",
              flush=True)
    t0 = time.perf_counter()
    seconds = interleaved_median_seconds(steps, repeats=args.repeats, warmup=1)  # warm-up compiles
    print(f"timed {args.repeats} rounds in {time.perf_counter() - t0:.0f} s (compilation included)", flush=True)
    tokens = int(batch.shape[0]) * (int(batch.shape[1]) - 1)
    ref = seconds.get(reference)
    ref_label = rows[reference]["method"] if ref else ""
    for m, s in seconds.items():
        rows[m] |= {"step_ms": 1e3 * s, "tokens_s": tokens / s, **({"vs_reference": ref / s} if ref else {})}
        print(f"{rows[m]['method']:>26}: {1e3 * s:8.1f} ms/step  {tokens / s:10,.0f} tokens/s"
              + (f"  {ref / s:.2f}x {ref_label}'s speed" if ref else ""), flush=True)
    return {"config": args.config if not args.variant else args.variant, "reference": ref_label,
            "repeats": args.repeats, "batch": list(map(int, batch.shape)), "rows": list(rows.values())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/rivals.py:synthetic30k,budget=20x",
                   help="the protocol's config with its dataset, budget and backbone; ,method=M is appended")
    p.add_argument("--methods", default=METHODS, help=f"comma-separated (default: {METHODS})")
    p.add_argument("--variant", action="append", default=[],
                   help='"LABEL=CONFIG [key=value ...]", repeated: time these configs instead of --methods')
    p.add_argument("--reference", default="", help="the method or variant label that speeds are relative to")
    p.add_argument("--repeats", type=int, default=7, help="rounds of one step per method (medians)")
    p.add_argument("--seed", type=int, default=0, help="of the batch's draws")
    p.add_argument("--out", default=str(RESULTS_DIR / "rivals-speed.json"))
    p.add_argument("--table", default="", help="also write results/NAME.json (a docs table)")
    p.add_argument("--machine", default="2-core CPU, shared")
    args = p.parse_args(argv)
    load_start = load_average()
    with exit_on_user_error():
        res = run(args)
    res = finish(res, args.out, load_start)
    if args.table:
        what = "variant" if args.variant else "method"
        labels = {"method": what, "vs_reference": f"vs {res['reference']}"}
        columns = [dict(c, label=labels.get(c["key"], c["label"])) for c in COLUMNS]
        spec = {"title": f"One training step of each {what}, interleaved"
                         + ("" if args.variant else f" ({args.config})"),
                "command": res["command"], "machine": args.machine,
                "source": f"python -m cprec.bench.rivals --table {args.table} (its JSON: {args.out})",
                "notes": f"batch {res['batch'][0]} x {res['batch'][1] - 1}; medians of {args.repeats} rounds; "
                         f"load average {res['load_average_start']:.1f} at the start, {res['load_average_end']:.1f} at the end",
                "columns": columns, "rows": res["rows"]}
        (RESULTS / f"{args.table}.json").write_text(dump_table(spec))
        print(f"wrote results/{args.table}.json")
    return res


if __name__ == "__main__":
    main()
