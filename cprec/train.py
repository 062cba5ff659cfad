"""The training loop: `train_and_evaluate(config, workdir)`.

The workdir holds config.json, metrics.jsonl, TensorBoard events, orbax
checkpoints and, once finished, results.json. Rerunning on the same workdir
resumes from the latest checkpoint; a finished run is not retrained.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from cprec.allocator import keep_freed_memory
from cprec.batching import WindowBatcher
from cprec.checkpointing import Checkpointer, best_state_like
from cprec.config import validate_config
from cprec.data import SequenceDataset, load_dataset
from cprec.errors import CprecError, WorkdirError
from cprec.evaluate import eval_splits, evaluate_split, make_rank_fn, topk_latency_ms
from cprec.factory import build_model, init_params, param_report, uncompressed_config
from cprec.jsonfile import write_json
from cprec.metric_writer import MetricWriter
from cprec.metrics import popularity_ranks, rank_metrics
from cprec.micro_batch import num_micro_batches
from cprec.model import NextItNet
from cprec.parallel import DataParallel, initialize_distributed


class TrainingDiverged(CprecError):
    """The loss became NaN or infinite."""


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    o = config.optim
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1), max(total_steps, o.warmup_steps + 1))
    elif o.warmup_steps > 0:
        lr = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    else:
        lr = o.lr
    if o.name == "adam":
        opt = optax.adam(lr) if o.weight_decay == 0 else optax.chain(optax.add_decayed_weights(o.weight_decay), optax.adam(lr))
    elif o.name == "adamw":
        opt = optax.adamw(lr, weight_decay=o.weight_decay)
    else:
        opt = optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(lr))
    if o.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(o.clip_norm), opt)
    return opt


def make_train_step(model: NextItNet, tx: optax.GradientTransformation, seed: int, micro_batches: int = 1):
    """One jitted step on a [B, L+1] window batch; the state is donated.

    With ``micro_batches`` = n > 1 the gradient is accumulated over n micro-batches of B/n rows in
    a ``lax.scan`` (see cprec/micro_batch.py for why): the same mean loss and gradient over all
    the batch's targets, summed in another order. Micro-batch i holds rows i, i+n, i+2n, ..., so
    every micro-batch takes the same share of each device's rows under data parallelism.
    """
    base_rng = jax.random.PRNGKey(seed)

    def loss_sum(params, batch, rng):
        mean, count = model.apply(
            {"params": params}, batch[:, :-1], batch[:, 1:], True, rngs={"dropout": rng}, method=NextItNet.loss
        )
        count = count.astype(jnp.float32)
        return mean * count, count

    def grads_of(params, batch, rng):
        (total, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(params, batch, rng)
        return total, count, grads

    def step(state: dict[str, Any], batch: jax.Array):
        rng = jax.random.fold_in(base_rng, state["step"])  # the same step gets the same randomness on resume
        params = state["params"]
        if micro_batches == 1:
            total, count, grads = grads_of(params, batch, rng)
        else:
            chunks = batch.reshape(-1, micro_batches, batch.shape[1]).transpose(1, 0, 2)

            def accumulate(acc, chunk_and_index):
                chunk, i = chunk_and_index
                return jax.tree.map(jnp.add, acc, grads_of(params, chunk, jax.random.fold_in(rng, i))), None

            zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (total, count, grads), _ = lax.scan(accumulate, zero, (chunks, jnp.arange(micro_batches)))
        scale = 1.0 / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": total * scale, "tokens": count, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=0)


def _check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir created by a different experiment."""
    path = workdir / "config.json"
    current = json.loads(config.to_json_best_effort())
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise WorkdirError(f"{path} is unreadable; use a new --workdir or delete that file") from None
        diff = _first_difference(stored, current)
        if diff is not None:
            raise WorkdirError(
                f"workdir {workdir} holds another experiment (config differs at {diff}); "
                "use a new --workdir or delete the old one"
            )


# Keys that may change when a run is resumed: derived numbers, and how often to log and checkpoint
# (neither changes the results; a long run may want rarer logs or more frequent checkpoints).
NOT_IDENTITY = ("report", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints")


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if f"{prefix}{key}" in NOT_IDENTITY:
                continue
            d = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if d is not None:
                return d
        return None
    return None if a == b else f"{prefix[:-1]}: {a!r} vs {b!r}"


def _format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Trains, evaluates on validation periodically and on test at the end; returns the test metrics."""
    validate_config(config)
    keep_freed_memory()  # about 2x faster steps on CPU; see cprec/allocator.py
    initialize_distributed()  # before any computation: joins the hosts of a multi-task SLURM job
    workdir = pathlib.Path(workdir)
    _check_workdir_config(workdir, config)
    parallel = DataParallel()
    parallel.check_divides("train.batch_size", config.train.batch_size)
    parallel.check_divides("eval.batch_size", config.eval.batch_size)
    results_path = workdir / "results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
        print(f"{workdir} already finished at step {results['step']}; not retraining (delete results.json to redo)")
        return results["test"]

    data: SequenceDataset = load_dataset(config.data)
    model = build_model(config, data.item_counts)
    micro_batches = num_micro_batches(config, parallel.num_devices, num_items=len(data.item_counts))
    report = param_report(model, build_model(uncompressed_config(config), data.item_counts))
    _print_report(report)
    # Written only once data and model are known good, so a failed start leaves no workdir behind.
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "config.json", {**json.loads(config.to_json_best_effort()), "report": report}, sort_keys=True)

    batcher = WindowBatcher(data.train, config.train.batch_size, config.seed)
    if config.train.num_steps > 0:
        total_steps = int(config.train.num_steps)
    else:
        total_steps = int(config.train.num_epochs * batcher.steps_per_epoch)
    tx = make_optimizer(config, total_steps)
    params = init_params(model, config.seed)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    ckpt = Checkpointer(workdir, config.train.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(start, state)
        print(f"resuming from checkpoint at step {start}")
    state = parallel.replicate(state)
    writer = MetricWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)
    try:
        if not start:
            writer.text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
            writer.text("data", "```\n" + json.dumps(data.meta, indent=2, default=str) + "\n```")
            pop = rank_metrics(popularity_ranks(data.item_counts, np.asarray(data.test_targets)), config.eval.ks)
            writer.scalars(0, {**report, **{f"popularity/test_{k}": v for k, v in pop.items()}})
            print("popularity baseline (test): " + ", ".join(f"{k} {v:.4f}" for k, v in pop.items()))
        train_step = make_train_step(model, tx, config.seed, micro_batches)
        test = _train_loop(config, data, model, train_step, state, start, total_steps, batcher, ckpt, writer, parallel)
        writer.hparams(_hparams(config), {f"hparam/test_{k}": v for k, v in test.items()} | {
            "hparam/params_total": report["params/total"]})
    finally:
        writer.close()
        ckpt.close()
    write_json(results_path, {"step": total_steps, "test": test, "report": report}, sort_keys=True)
    return test


def _train_loop(config, data, model, train_step, state, start, total_steps, batcher, ckpt, writer, parallel) -> dict[str, float]:
    t = config.train
    rank_fn = make_rank_fn(model)
    ks = tuple(config.eval.ks)

    splits = eval_splits(data, config.eval.num_users, verbose=True)

    def evaluate(split: str) -> dict[str, float]:
        inputs, targets = splits[split]
        return evaluate_split(rank_fn, state["params"], inputs, targets, config.eval.batch_size, ks,
                              parallel.shard, parallel.gather)

    # The test split is scored with the parameters of the best validation score (model selection).
    select = t.select_metric
    best_ckpt = Checkpointer(ckpt.directory.parent, 1, subdir="best")
    best_like = best_state_like(state["params"])
    best_step = best_ckpt.latest_step()
    best_score = float(best_ckpt.restore(best_step, best_like)["score"]) if best_step else -np.inf

    try:  # close (and so finish any async save of) the best checkpoint even when training stops early
        pending: list[dict[str, jax.Array]] = []
        timer, timed_tokens, timed_steps = None, 0.0, 0
        for step in range(start, total_steps):
            state, metrics = train_step(state, parallel.shard(batcher.batch(step)))
            pending.append(metrics)
            done = step + 1
            if timer is None:  # the first step compiles: time from its end
                jax.block_until_ready(metrics["loss"])
                timer, pending = time.perf_counter(), []
                continue
            if done % t.log_every == 0 or done == total_steps:
                fetched = jax.device_get(pending)
                pending = []
                losses = np.array([m["loss"] for m in fetched])
                if not np.all(np.isfinite(losses)):
                    raise TrainingDiverged(
                        f"loss became {losses[~np.isfinite(losses)][0]} at or before step {done}; the last good checkpoint "
                        f"is kept in {ckpt.directory}; lower optim.lr or set optim.clip_norm"
                    )
                timed_tokens += sum(float(m["tokens"]) for m in fetched)
                timed_steps += len(fetched)
                elapsed = time.perf_counter() - timer
                tps = timed_tokens / max(elapsed, 1e-9)
                eta = elapsed / max(timed_steps, 1) * (total_steps - done)
                writer.scalars(done, {"train/loss": losses.mean(), "train/tokens_per_sec": tps,
                                      "train/grad_norm": np.mean([m["grad_norm"] for m in fetched]),
                                      "train/epoch": done / batcher.steps_per_epoch})
                print(f"step {done}/{total_steps} | epoch {done / batcher.steps_per_epoch:.2f} | loss {losses.mean():.4f}"
                      f" | {tps:,.0f} tokens/s | eta {_format_eta(eta)}", flush=True)
            if done % t.eval_every == 0 or done == total_steps:
                val = evaluate("val")
                writer.scalars(done, {f"val/{k}": v for k, v in val.items()})
                if val[select] > best_score:
                    best_score, best_step = val[select], done
                    best_ckpt.save(done, {"params": state["params"], **parallel.replicate(
                        {"score": jnp.asarray(best_score), "step": jnp.asarray(done, jnp.int32)})})
                print(f"step {done} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items() if "@" in k), flush=True)
            if done % t.checkpoint_every == 0 or done == total_steps:
                ckpt.save(done, state)
        if best_step:
            state = {**state, "params": parallel.replicate(best_ckpt.restore(best_step, best_like)["params"])}
    finally:
        best_ckpt.close()
    test = evaluate("test")
    serve = topk_latency_ms(model, state["params"], data.test_inputs, config.eval.topk_n, config.eval.topk_batches)
    writer.scalars(total_steps, {f"test/{k}": v for k, v in test.items()} | serve
                   | {"test/selected_step": best_step or total_steps})
    print(f"test (parameters of step {best_step}, best val/{select} {best_score:.4f}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in test.items()), flush=True)
    print("serving: " + ", ".join(f"{k} {v:.2f}" for k, v in serve.items()), flush=True)
    return test


def _print_report(report: dict[str, float]) -> None:
    print(
        "parameters: embedding {e:,} | residual stack {s:,} | output {o:,} | total {t:,} ({b:,} bytes) | "
        "compression {r:.2f}x vs uncompressed NextItNet ({bt:,})".format(
            e=report["params/embedding"], s=report["params/residual_stack"], o=report["params/output"],
            t=report["params/total"], b=report["params/bytes"], r=report["params/compression_ratio"],
            bt=report["params/baseline_total"])
    )


def _hparams(config: ml_collections.ConfigDict) -> dict[str, object]:
    flat: dict[str, object] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(config, "")
    return flat
