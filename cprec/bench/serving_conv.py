"""The serving encoder's conv, interleaved A/B: XLA's dilated convolution against the matmul over taps.

    python -m cprec.bench.serving_conv exports/cprec-demo [--history 20,50] [--batches 1,16,64,256]

Loads the export twice in one process, one ``Recommender`` compiled with ``padded_conv_fast`` (what
serving uses) and one with the model's ``padded_conv``, then times ``recommend`` (top-20) of random
histories of each length at each batch size, alternating the two for --rounds rounds; reports the
medians, the per-round ratios and how many top-20 lists are identical. Saves
bench_results/serving-conv-<artifact>-<platform>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import cprec.serve.incremental as incremental
from cprec.bench.server import run_on_artifact
from cprec.model.conv import padded_conv, padded_conv_fast
from cprec.serve.recommender import Recommender

CONVS = {"matmul": padded_conv, "xla": padded_conv_fast}


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    recs = {name: Recommender.load(args.artifact) for name in CONVS}
    raw = recs["xla"].ids.raw[1:]
    res: dict = {"artifact": args.artifact, "rounds": args.rounds, "rows": []}
    for length in _ints(args.history):
        data = {b: [[raw[i] for i in rng.integers(0, len(raw), length)] for _ in range(b)] for b in _ints(args.batches)}
        try:
            for name, rec in recs.items():
                # Each Recommender's jitted calls trace on first use: compile them under their own conv.
                incremental.padded_conv_fast = CONVS[name]
                for rows in data.values():
                    rec.recommend(rows, n=20)
        finally:
            incremental.padded_conv_fast = padded_conv_fast
        for b, rows in data.items():
            same = sum(x.items == y.items for x, y in zip(recs["matmul"].recommend(rows, 20), recs["xla"].recommend(rows, 20)))
            reps = max(1, 64 // b)
            ms: dict[str, list[float]] = {name: [] for name in recs}
            for _ in range(args.rounds):
                for name, rec in recs.items():
                    t = time.perf_counter()
                    for _ in range(reps):
                        rec.recommend(rows, n=20)
                    ms[name].append((time.perf_counter() - t) / reps * 1e3)
            row = {"history": length, "batch": b, "same_top20": same,
                   **{f"{n}_ms": statistics.median(v) for n, v in ms.items()},
                   "per_round": [m / x for m, x in zip(ms["matmul"], ms["xla"])]}
            row["speedup"] = row["matmul_ms"] / row["xla_ms"]
            res["rows"].append(row)
            print(f"[conv] history {length:3d} batch {b:4d}: matmul {row['matmul_ms']:8.2f} ms, xla {row['xla_ms']:8.2f} ms,"
                  f" {row['speedup']:.2f}x (rounds {min(row['per_round']):.2f}-{max(row['per_round']):.2f}x),"
                  f" same top-20 {same}/{b}", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m cprec.bench.serving_conv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="an export directory (python -m cprec.export)")
    p.add_argument("--history", default="20,50", help="history lengths, comma-separated")
    p.add_argument("--batches", default="1,16,64,256", help="batch sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    return run_on_artifact(run, args, "serving-conv")


if __name__ == "__main__":
    main()
