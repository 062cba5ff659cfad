"""What share of a training step the optimizer update and the item tables' dense gradient take.

  python -m cprec.bench.optimizer                                  # 1M items: CpRec's preset and NextItNet
  python -m cprec.bench.optimizer --config experiments/cprec.py:synthetic30k --baseline-batch 256
  python -m cprec.bench.optimizer --config experiments/nextitnet.py:synthetic1m   # the sampled-softmax baseline

Decides whether a row-sparse ("lazy") Adam for the item tables would pay: Adam updates every row
of every table each step, and the gradient of an embedding lookup is a dense [V, d] table that is
mostly zeros. Times, per model, after compilation and as training runs them (jitted, the automatic
micro-batches, the config's optimizer):

- ``step``: the whole train step (forward, backward, optimizer update);
- ``grads``: the summed gradient of the batch alone (no update);
- ``grads_frozen_tables``: the same with the input embedding's item tables held constant (no
  gradient for them: these are the row-sparse ones, only the rows a batch looks up get any; the
  output layer's tables get a dense gradient from the softmax normaliser, lazy or not);
- ``update``: the optimizer update and ``apply_updates`` alone, on a gradient of the same shapes.

``update / step`` is the optimizer's share (``(step - grads) / step`` bounds it from above) and
``(grads - grads_frozen_tables) / step`` the dense input-table gradients' (what a row-sparse update
would save besides the optimizer's own work). A tied model has no row-sparse table: its one table
also gets the output layer's dense gradient. Windows are i.i.d. draws from a Zipf(1) popularity over the V frequency-ordered
ids (the synthetic data's long tail), so no dataset needs to be prepared.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from cprec.bench.common import RESULTS_DIR, finish, load_average
from cprec.bench.tree_softmax import zipf_counts
from cprec.config import load_config_file, validate_config
from cprec.model.builder import build_model, clustered, count_params, init_params, uncompressed_config
from cprec.model.param_groups import decay_group, param_path
from cprec.timing import median_seconds
from cprec.train.loop import make_training
from cprec.train.micro_batch import num_micro_batches
from cprec.train.sampling import Sampler
from cprec.train.step import loss_capacities, make_batch_grads, make_optimizer, make_train_step, new_train_state


def zipf_windows(counts: np.ndarray, rows: int, length: int, seed: int) -> jnp.ndarray:
    """[rows, length] ids drawn i.i.d. with probabilities proportional to ``counts``."""
    p = counts / counts.sum()
    return jnp.asarray(np.random.default_rng(seed).choice(len(counts), size=(rows, length), p=p), jnp.int32)


def is_input_table(name: str) -> bool:
    """The input embedding's item tables: the parameters whose gradient is row-sparse."""
    return name.startswith("embed/") and decay_group(name) == "table"


def bench_model(config, counts: np.ndarray, repeats: int) -> dict:
    """The four timings (module docstring) for ``config``'s model on one batch of its batch size."""
    num_items = len(counts)
    model = build_model(config, counts, loss_capacities(config, counts, jax.device_count()))
    params = init_params(model, 0)
    tx = make_optimizer(config, 1000)
    micro = num_micro_batches(config, num_items=num_items)
    sampler = Sampler.from_config(config, counts)
    batch = zipf_windows(counts, config.train.batch_size, config.data.max_len + 1, 0)
    rng = jax.random.PRNGKey(0)
    row = {"params": count_params(params), "batch_size": int(config.train.batch_size), "micro_batches": micro,
           "input_table_params": int(sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                                         if is_input_table(param_path(p))))}

    def timed(name, fn):
        t0 = time.perf_counter()
        seconds = median_seconds(fn, repeats=repeats)
        row[f"{name}_s"] = seconds
        print(f"  {name:22s} {1e3 * seconds:10.1f} ms   ({time.perf_counter() - t0:.0f} s with compilation)", flush=True)

    def norm_of(frozen):
        grads = make_batch_grads(model, micro, frozen, sampler)
        return jax.jit(lambda p, b: jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads(p, b, rng)[2]))))

    step = make_train_step(model, tx, 0, micro, sampler)
    holder = {"state": new_train_state(params, tx)}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    if sampler is not None and config.model.embedding == "full" and config.optim.name == "adam":
        _sparse_ab(config, model, counts, micro, batch, row, repeats, lambda: one_step())
    else:
        timed("step", one_step)
    params = holder["state"]["params"]
    grads_all, grads_frozen = norm_of(None), norm_of(is_input_table)
    timed("grads", lambda: grads_all(params, batch))
    timed("grads_frozen_tables", lambda: grads_frozen(params, batch))
    fake_grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)

    def update(state, grads):
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {**state, "params": jax.tree.map(jnp.add, state["params"], updates), "opt_state": opt_state}

    upd = jax.jit(update, donate_argnums=0)

    def one_update():
        holder["state"] = upd(holder["state"], fake_grads)
        return holder["state"]["step"]

    timed("update", one_update)
    row["update_share"] = row["update_s"] / row["step_s"]
    # What the step costs beyond its gradient: the update plus the scaling, the grad norm, donation.
    row["beyond_grads_share"] = max(0.0, row["step_s"] - row["grads_s"]) / row["step_s"]
    row["table_grad_share"] = max(0.0, row["grads_s"] - row["grads_frozen_tables_s"]) / row["step_s"]
    print(f"  optimizer update {100 * row['update_share']:.1f}% of the step (step - grads: "
          f"{100 * row['beyond_grads_share']:.1f}%); dense input-table gradients "
          f"{100 * row['table_grad_share']:.1f}%", flush=True)
    return row


def _sparse_ab(config, model, counts, micro, batch, row, repeats: int, dense_step) -> None:
    """Times the dense step and the row-sparse (lazy Adam) one of a sampled-softmax model, interleaved:
    ``step_s`` (dense), ``step_sparse_tables_s`` and their ratio."""
    sparse_config = config.copy_and_resolve_references()
    sparse_config.optim.sparse_tables = True
    state, step = make_training(sparse_config, model, counts, 1000, micro)
    holder = {"state": state}

    def sparse_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    dense, sparse = [], []
    for fn in (dense_step, sparse_step):  # compile both first
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for fn, out in ((dense_step, dense), (sparse_step, sparse)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - t0)
    row["step_s"], row["step_sparse_tables_s"] = float(np.median(dense)), float(np.median(sparse))
    row["sparse_tables_speedup"] = row["step_s"] / row["step_sparse_tables_s"]
    print(f"  step (dense Adam)      {1e3 * row['step_s']:10.1f} ms\n"
          f"  step (sparse tables)   {1e3 * row['step_sparse_tables_s']:10.1f} ms   "
          f"({row['sparse_tables_speedup']:.2f}x, interleaved, medians of {repeats})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/cprec.py:synthetic1m",
                   help="the compressed model's experiment config (default: CpRec's 1M-item preset)")
    p.add_argument("--items", type=int, default=0, help="V (default: the config's data.num_items)")
    p.add_argument("--baseline-batch", type=int, default=32,
                   help="batch of the uncompressed NextItNet (default 32: at 1M items its full softmax takes "
                        "tens of seconds a step at the preset's 256 on a CPU); 0 skips it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS_DIR / f"optimizer-{jax.default_backend()}.json"))
    args = p.parse_args()
    load_start = load_average()
    config = load_config_file(args.config)
    validate_config(config)
    counts = zipf_counts(args.items or int(config.data.num_items) + 1, 1.0)
    models = {"cprec" if clustered(config) else f"nextitnet-{config.model.softmax}": config}
    if args.baseline_batch > 0:
        base = uncompressed_config(config)
        base.train.batch_size = args.baseline_batch
        models["nextitnet"] = base
    rows = {}
    for name, c in models.items():
        m = c.model
        print(f"{name}: V={len(counts):,} d={m.dim} {m.embedding}/{m.softmax}/{m.sharing} "
              f"optim={c.optim.name} batch {c.train.batch_size}x{c.data.max_len}", flush=True)
        rows[name] = bench_model(c, counts, args.repeats)
    finish({"config": args.config, "num_items": len(counts), "repeats": args.repeats, "rows": rows}, args.out, load_start)


if __name__ == "__main__":
    main()
