"""Top-n of a trained model: early-stop `top_k` against `lax.top_k(log_prob)`, on real histories.

    python -m cprec.bench.trained_topk runs/cprec-1m [--n 20] [--batches 1 256] [--repeats 5]

Loads the run's best parameters (cprec.pretrained), encodes the test histories of the first
`batch` users, and times (a) the output layer alone on those hidden states and (b) the whole
recommendation (encoder + output layer), both jitted, with the cluster statistics computed once.
Checks that both paths return the same items and scores and reports how many tail clusters the
early stop expanded. Saves bench_results/trained_topk-<run>.json.
"""
from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np
from jax import lax

from cprec.bench.common import RESULTS_DIR, finish, load_average
from cprec.bench.tree_softmax import compare_topk, real_items, timed
from cprec.errors import CprecError, exit_on_user_error
from cprec.eval.pretrained import load_run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a run directory written by run.py (tree-softmax model)")
    p.add_argument("--n", type=int, default=20, help="items to recommend")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="batch sizes (users per call)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default bench_results/trained_topk-<run>.json)")
    return p


def bench_run(workdir: str, n: int, batches: list[int], repeats: int) -> dict:
    run = load_run(workdir)
    if run.config.model.softmax != "tree":
        raise CprecError(f"{workdir} trained a full softmax (model.softmax={run.config.model.softmax!r}); "
                         "the early-stop top_k comparison needs a tree-softmax run")
    model, params = run.model, run.params
    stats = jax.jit(lambda p: model.apply({"params": p}, method="serving_stats"))(params)
    encode_last = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode")[:, -1])

    # The output layer alone, applied to hidden states (flax binds `m.head` inside apply only).
    def head_top_k(p, s, h):
        return model.apply({"params": p}, h, n, s, method=lambda m, *a: m.head.top_k(*a))

    def head_full(p, h):
        return lax.top_k(real_items(model.apply({"params": p}, h, method=lambda m, *a: m.head.log_prob(*a))), n)

    calls = {
        "head early stop": jax.jit(head_top_k),
        "head full": jax.jit(head_full),
        "model early stop": jax.jit(lambda p, s, x: model.apply({"params": p}, x, n, s, method="top_k")),
        "model full": jax.jit(lambda p, x: lax.top_k(real_items(model.apply({"params": p}, x,
                                                                             method="last_log_prob")), n)),
    }
    inputs = np.asarray(run.data.test_inputs)
    rows = []
    for b in batches:
        x = jax.numpy.asarray(np.resize(inputs[: max(b, 1)], (b, inputs.shape[1])))
        h = encode_last(params, x)
        t_head = timed({"fast": (calls["head early stop"], (params, stats, h)),
                        "full": (calls["head full"], (params, h))}, repeats)
        t_model = timed({"fast": (calls["model early stop"], (params, stats, x)),
                         "full": (calls["model full"], (params, x))}, repeats)
        scores, ids, expanded = calls["head early stop"](params, stats, h)
        row = {"batch": b,
               "head_early_stop_ms": 1e3 * t_head["fast"]["median_s"], "head_full_ms": 1e3 * t_head["full"]["median_s"],
               "model_early_stop_ms": 1e3 * t_model["fast"]["median_s"],
               "model_full_ms": 1e3 * t_model["full"]["median_s"],
               "mean_expanded_clusters": float(np.asarray(expanded).sum(1).mean()),
               "tail_clusters": int(expanded.shape[1]),
               **compare_topk((scores, ids), calls["head full"](params, h))}
        row["head_speedup"] = row["head_full_ms"] / row["head_early_stop_ms"]
        row["model_speedup"] = row["model_full_ms"] / row["model_early_stop_ms"]
        rows.append(row)
        print(f"batch {b:4d}: output layer {row['head_early_stop_ms']:8.2f} ms early stop vs {row['head_full_ms']:8.2f} "
              f"full ({row['head_speedup']:.1f}x); encoder + output {row['model_early_stop_ms']:8.2f} vs "
              f"{row['model_full_ms']:8.2f} ms ({row['model_speedup']:.1f}x); expanded "
              f"{row['mean_expanded_clusters']:.2f}/{row['tail_clusters']}; identical {row['identical']}", flush=True)
    return {"workdir": str(workdir), "step": run.step, "params_from": run.source, "num_items": model.num_items,
            "cutoffs": list(model.cutoffs), "ranks": list(model.ranks), "n": n, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    load_start = load_average()
    with exit_on_user_error():
        res = bench_run(args.workdir, args.n, args.batches, args.repeats)
    res["repeats"] = args.repeats
    return finish(res, args.out or RESULTS_DIR / f"trained_topk-{pathlib.Path(args.workdir).name}.json", load_start)


if __name__ == "__main__":
    main()
