"""Training throughput of NextItNet (full softmax) and its FLOP/s against the measured matmul peak.

  python -m cprec.bench.nextitnet                    # ml-100k if present, RecBole's model, d=64 and d=256
  python -m cprec.bench.nextitnet --dims 64 --batch 512 --repeats 7
  python -m cprec.bench.nextitnet --dims 64 --micro-batches 128,64,32   # micro-batch sizes to compare

Throughput counts target items (non-padding positions) per second of jitted
train steps (forward, backward, Adam update), after compilation, once with the
whole batch in one pass and once with the automatic micro-batches that training
uses (cprec/train/micro_batch.py). FLOPs come from XLA's cost analysis of the compiled
step.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from cprec.train.batching import WindowBatcher
from cprec.bench.common import compiled_flops, matmul_peak_flops, save_results
from cprec.config import base_config
from cprec.data import load_dataset
from cprec.model.builder import build_model, init_params
from cprec.train.micro_batch import num_micro_batches
from cprec.model.sequential import target_mask
from cprec.timing import median_seconds
from cprec.train import make_optimizer, make_train_step, new_train_state

_WHOLE = "whole"


def bench_dim(config, data, dim: int, micro_batch_size: int, steps: int, repeats: int) -> dict[str, float]:
    config = config.copy_and_resolve_references()
    config.model.dim = dim
    config.train.micro_batch_size = micro_batch_size
    model = build_model(config, data.item_counts)
    tx = make_optimizer(config, 1000)
    params = init_params(model, 0)
    micro = num_micro_batches(config, num_items=len(data.item_counts))
    step_fn = make_train_step(model, tx, 0, micro)
    batcher = WindowBatcher(data.train, config.train.batch_size, 0)
    batches = [jnp.asarray(batcher.batch(i)) for i in range(steps)]
    tokens = float(sum(int(target_mask(np.asarray(b)[:, :-1], np.asarray(b)[:, 1:]).sum()) for b in batches))
    state = new_train_state(params, tx)
    # XLA's cost analysis counts a loop body once, so the FLOPs come from the unsplit step: the
    # same arithmetic as the micro-batched one.
    flops_per_step = compiled_flops(make_train_step(model, tx, 0, 1), state, batches[0])
    holder = {"state": state}

    def run():
        s = holder["state"]
        for b in batches:
            s, m = step_fn(s, b)
        holder["state"] = s
        return m["loss"]

    seconds = median_seconds(run, repeats=repeats)
    return {"dim": dim, "micro_batches": micro, "tokens_per_sec": tokens / seconds, "steps_per_sec": steps / seconds,
            "flops_per_step": flops_per_step, "achieved_flops": flops_per_step * steps / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml-100k", help="dataset name for cprec.data (default ml-100k)")
    p.add_argument("--dims", default="64,256")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--micro-batches", default=f"{_WHOLE},0",
                   help="rows per micro-batch to compare, comma-separated (0: automatic, the training default; "
                        f"'{_WHOLE}': the whole batch in one pass)")
    p.add_argument("--steps", type=int, default=10, help="train steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default bench_results/nextitnet-<platform>.json)")
    args = p.parse_args()

    config = base_config()
    config.data.name = args.data
    config.train.batch_size = args.batch
    data = load_dataset(config.data)
    peak = matmul_peak_flops()
    print(f"{jax.devices()[0].device_kind}: measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for dim in (int(d) for d in args.dims.split(",")):
        for spec in args.micro_batches.split(","):
            size = args.batch // jax.device_count() if spec == _WHOLE else int(spec)
            row = bench_dim(config, data, dim, size, args.steps, args.repeats)
            row["fraction_of_peak"] = row["achieved_flops"] / peak
            rows.append(row)
            print(f"d={dim:4d} | {row['micro_batches']:3d} micro-batch(es) | {row['tokens_per_sec']:>8,.0f} target items/s"
                  f" | {row['achieved_flops'] / 1e9:6.1f} GFLOP/s = {100 * row['fraction_of_peak']:5.1f}% of matmul peak",
                  flush=True)
    path = save_results("nextitnet", {"data": args.data, "num_items": int(data.num_items), "batch_size": args.batch,
                                      "max_len": int(data.max_len), "matmul_peak_flops": peak, "rows": rows},
                        args.out)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
