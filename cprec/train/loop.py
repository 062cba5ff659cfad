"""The training loop: `train_and_evaluate(config, workdir)`.

The workdir holds config.json, metrics.jsonl, TensorBoard events, orbax
checkpoints and, once finished, results.json. Rerunning on the same workdir
resumes from the latest checkpoint; a finished run is not retrained.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import pathlib
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cprec.config import validate_config, with_defaults
from cprec.data import SequenceDataset, load_dataset
from cprec.errors import CprecError, WorkdirError
from cprec.eval.evaluate import eval_splits, evaluate_split, make_rank_fn, topk_latency_ms
from cprec.eval.metrics import popularity_ranks, rank_metrics
from cprec.jsonfile import write_json
from cprec.model.builder import (budget_choice, build_model, init_from_data, init_params, param_report,
                                 uncompressed_config, uses_budget)
from cprec.model.sequential import SequentialRecommender
from cprec.runtime.allocator import keep_freed_memory
from cprec.runtime.checkpointing import Checkpointer, best_state_like
from cprec.runtime.parallel import DataParallel, initialize_distributed
from cprec.train.batching import WindowBatcher
from cprec.train.metric_writer import MetricWriter
from cprec.train.micro_batch import num_micro_batches
from cprec.train.sampling import Sampler
from cprec.train.pruning import make_pruner
from cprec.train.sparse_tables import make_sparse_train_step, new_sparse_state
from cprec.train.step import learning_rate, loss_capacities, make_optimizer, make_train_step, new_train_state


class TrainingDiverged(CprecError):
    """The loss became NaN or infinite."""


def _check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir created by a different experiment."""
    path = workdir / "config.json"
    current = json.loads(config.to_json_best_effort())
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise WorkdirError(f"{path} is unreadable; use a new --workdir or delete that file") from None
        diff = _first_difference(with_defaults(stored), current)
        if diff is not None:
            raise WorkdirError(
                f"workdir {workdir} holds another experiment (config differs at {diff}); "
                "use a new --workdir or delete the old one"
            )


# Keys that may change when a run is resumed: derived numbers, and how often to log and checkpoint
# (neither changes the results; a long run may want rarer logs or more frequent checkpoints).
NOT_IDENTITY = ("report", "budget", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints")


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
    started = time.perf_counter()  # wall times (val/wall_s, results' wall_s) count data preparation and compiling
    validate_config(config)
    keep_freed_memory()  # faster steps on CPU: freed buffers are reused, not returned (cprec/runtime/allocator.py)
    initialize_distributed()  # before any computation: joins the hosts of a multi-task SLURM job
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory; give a new or existing run directory")
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
    num_items = len(data.item_counts)
    capacities = loss_capacities(config, data.item_counts, parallel.num_devices)
    model = build_model(config, data.item_counts, capacities)
    micro_batches = num_micro_batches(config, parallel.num_devices, num_items=num_items)
    report = param_report(model, build_model(uncompressed_config(config), data.item_counts))
    stored = {**json.loads(config.to_json_best_effort()), "report": report}
    if uses_budget(config):  # the solver's choice, kept with the run (load_run rebuilds exactly this model)
        choice = budget_choice(config, data.item_counts)
        print(choice.summary())
        stored["budget"] = choice.as_dict()
        report["params/budget"] = choice.target
    _print_report(report)
    # Written only once data and model are known good, so a failed start leaves no workdir behind.
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "config.json", stored, sort_keys=True)

    batcher = WindowBatcher(data.train, config.train.batch_size, config.seed)
    if config.train.num_steps > 0:
        total_steps = int(config.train.num_steps)
    else:
        total_steps = int(config.train.num_epochs * batcher.steps_per_epoch)
    state, train_step = make_training(config, model, data.item_counts, total_steps, micro_batches, data.train)

    with contextlib.ExitStack() as closing:  # closing the checkpointers finishes their async saves, even on errors
        ckpt = Checkpointer(workdir, config.train.keep_checkpoints)
        closing.callback(ckpt.close)
        start = ckpt.latest_step() or 0
        if start:
            state = ckpt.restore(start, state)
            print(f"resuming from checkpoint at step {start}")
        state = parallel.replicate(state)
        # The test split is scored with the parameters of the best validation score (model selection).
        best = _BestCheckpoint(workdir, state["params"], config.train.select_metric, parallel)
        closing.callback(best.close)
        writer = MetricWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)
        closing.callback(writer.close)
        if not start:
            _write_run_header(writer, config, data, report)
        validator = _Validator(config, data, model, parallel)
        progress = _Progress(total_steps, batcher.steps_per_epoch, ckpt.directory, writer, started)
        state = _train(config.train, state, start, total_steps, train_step, batcher, parallel, ckpt, best,
                       progress, validator, writer)
        params = best.params() if best.step else state["params"]
        # Which saved parameters the test metrics belong to (an export of other ones must not claim them).
        tested = {"source": "best", "step": best.step} if best.step else {"source": "checkpoints", "step": total_steps}
        test = _test(config, data, model, params, validator, best, total_steps, writer)
        writer.hparams(_hparams(config), {f"hparam/test_{k}": v for k, v in test.items()} | {
            "hparam/params_total": report["params/total"]})
    # The command and date a results/ table cites (results/README.md).
    provenance = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]),
                  "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    # A resumed run's wall time is that of its last attempt, and says so.
    wall = {"wall_s": time.perf_counter() - started, "wall_s_resumed_from_step": start}
    write_json(results_path, {"step": total_steps, "test": test, "test_params": tested, "report": report,
                              **wall, **provenance}, sort_keys=True)
    return test


def make_training(config: ml_collections.ConfigDict, model: SequentialRecommender, item_counts: np.ndarray, total_steps: int,
                  micro_batches: int, windows: np.ndarray | None = None) -> tuple[dict, Callable]:
    """The initial train state and the jitted step: the optax optimizer over every parameter, or with
    ``optim.sparse_tables`` a lazy Adam for the item tables and the optax optimizer for the rest.
    ``windows``: the training windows, for what the data fixes before training (``init_from_data``)."""
    sampler = Sampler.from_config(config, item_counts)
    params = init_params(model, config.seed)
    if windows is not None:
        params = init_from_data(config, model, params, windows)
    if not config.optim.sparse_tables:
        tx = make_optimizer(config, total_steps)
        pruner = make_pruner(config, total_steps, dict(model.table_options).get("prune_sparsity"))
        return new_train_state(params, tx), make_train_step(model, tx, config.seed, micro_batches, sampler, pruner)
    dense_tx = make_optimizer(config, total_steps, clip=False)  # the step clips every gradient at once
    lr = learning_rate(config, total_steps)
    step = make_sparse_train_step(model, config, dense_tx, lr if callable(lr) else (lambda count: lr), sampler,
                                  micro_batches)
    return new_sparse_state(params, dense_tx), step


def itstime(done: int, every: int, total_steps: int) -> bool:
    """Whether a periodic action is due after ``done`` steps: every ``every`` steps, and at the end."""
    return done % every == 0 or done == total_steps


def _train(t: ml_collections.ConfigDict, state: dict, start: int, total_steps: int, train_step: Callable,
           batcher: WindowBatcher, parallel: DataParallel, ckpt: Checkpointer, best: _BestCheckpoint,
           progress: _Progress, validator: _Validator, writer: MetricWriter) -> dict:
    """Steps ``start`` .. ``total_steps``; the same periodic actions at the same steps however often it resumes."""
    for step in range(start, total_steps):
        state, metrics = train_step(state, parallel.shard(batcher.batch(step)))
        progress.add(metrics, compiled_now=step == start)
        done = step + 1
        log, validate, save = (itstime(done, every, total_steps) for every in (t.log_every, t.eval_every, t.checkpoint_every))
        if log or validate or save:
            progress.check_finite(done)  # before anything is saved: a diverged state is never checkpointed
        if log:
            progress.log(done)
        if validate:
            val = validator("val", state["params"], done)
            writer.scalars(done, {f"val/{k}": v for k, v in val.items()} | {"val/wall_s": progress.wall_s()})
            best.offer(done, val, state["params"])
            print(f"step {done} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items() if "@" in k), flush=True)
        if save:
            ckpt.save(done, state)
    return state


def _test(config: ml_collections.ConfigDict, data: SequenceDataset, model: SequentialRecommender, params: Any,
          validator: _Validator, best: _BestCheckpoint, total_steps: int, writer: MetricWriter) -> dict[str, float]:
    """Test metrics of the selected parameters, and the top-n serving latency of the model."""
    test = validator("test", params, best.step or total_steps)
    serve = topk_latency_ms(model, params, data.test_inputs, config.eval.topk_n, config.eval.topk_batches)
    writer.scalars(total_steps, {f"test/{k}": v for k, v in test.items()} | serve
                   | {"test/selected_step": best.step or total_steps})
    print(f"test (parameters of step {best.step}, best val/{best.metric} {best.score:.4f}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in test.items()), flush=True)
    if serve:  # eval.topk_batches = () skips the timing
        print("serving: " + ", ".join(f"{k} {v:.2f}" for k, v in serve.items()), flush=True)
    return test


def _write_run_header(writer: MetricWriter, config: ml_collections.ConfigDict, data: SequenceDataset,
                      report: dict[str, float]) -> None:
    writer.text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
    writer.text("data", "```\n" + json.dumps(data.meta, indent=2, default=str) + "\n```")
    # On the users the models are tested on (a fixed subset with eval.num_users), so the rows compare.
    _, targets = eval_splits(data, config.eval.num_users)["test"]
    pop = rank_metrics(popularity_ranks(data.item_counts, np.asarray(targets)), config.eval.ks)
    writer.scalars(0, {**report, **{f"popularity/test_{k}": v for k, v in pop.items()}})
    print("popularity baseline (test): " + ", ".join(f"{k} {v:.4f}" for k, v in pop.items()))


class _Validator:
    """Full-ranking metrics of one split ('val' or 'test') for given parameters."""

    def __init__(self, config: ml_collections.ConfigDict, data: SequenceDataset, model: SequentialRecommender,
                 parallel: DataParallel) -> None:
        self._rank_fn = make_rank_fn(model)
        self._splits = eval_splits(data, config.eval.num_users, verbose=True)
        self._batch_size, self._ks, self._parallel = config.eval.batch_size, tuple(config.eval.ks), parallel

    def __call__(self, split: str, params: Any, step: int) -> dict[str, float]:
        """Metrics of the parameters of training step ``step`` (named in the error on a NaN score)."""
        inputs, targets = self._splits[split]
        return evaluate_split(self._rank_fn, params, inputs, targets, self._batch_size, self._ks,
                              self._parallel.shard, self._parallel.gather, split=split, step=step)


class _BestCheckpoint:
    """The parameters of the best validation value so far, in ``<workdir>/best`` (survives resumes).

    A resumed run replays the steps after its last training checkpoint, and best/ may already hold
    one of them, or a later one: the replayed step then wins only with a better score, replacing the
    saved one even at the same or a lower step. The new step is written before the old one is removed
    (at the next offer or at close, once the write has finished), so a kill never leaves best/ empty;
    on start, the best-scoring of the kept steps is the one used.
    """

    def __init__(self, workdir: pathlib.Path, params: Any, metric: str, parallel: DataParallel) -> None:
        self.metric, self._parallel = metric, parallel
        self._ckpt = Checkpointer(workdir, None, subdir="best")
        self._like = best_state_like(params)
        self.step, self.score = None, -np.inf
        kept = self._ckpt.all_steps()
        for step in kept:
            score = float(self._ckpt.restore(step, {"score": self._like["score"]}, partial=True)["score"])
            if score > self.score:
                self.step, self.score = step, score
        self._stale = [s for s in kept if s != self.step]  # removed once nothing is in flight

    def offer(self, step: int, metrics: dict[str, float], params: Any) -> None:
        if metrics[self.metric] <= self.score:
            return
        self._drop_stale()
        if step == self.step:  # the replay of a step saved before the kill, now scoring higher
            self._ckpt.delete(step)
        elif self.step is not None:
            self._stale.append(self.step)
        self.score, self.step = metrics[self.metric], step
        self._ckpt.save(step, {"params": params, **self._parallel.replicate(
            {"score": jnp.asarray(self.score), "step": jnp.asarray(step, jnp.int32)})}, force=True)

    def params(self) -> Any:
        return self._parallel.replicate(self._ckpt.restore(self.step, self._like)["params"])

    def _drop_stale(self) -> None:
        for step in self._stale:
            self._ckpt.delete(step)
        self._stale = []

    def close(self) -> None:
        self._drop_stale()
        self._ckpt.close()


class _Progress:
    """Losses, throughput and ETA between log steps, and the NaN guard.

    Metrics stay on the device until a periodic action needs them, so steps are dispatched
    without waiting for the host. The step that compiled is left out of the throughput.
    """

    def __init__(self, total_steps: int, steps_per_epoch: int, ckpt_dir: pathlib.Path, writer: MetricWriter,
                 started: float | None = None) -> None:
        self.total_steps, self.steps_per_epoch, self.ckpt_dir, self.writer = total_steps, steps_per_epoch, ckpt_dir, writer
        self.started = time.perf_counter() if started is None else started
        self._pending: list[dict[str, jax.Array]] = []  # on the device, not yet checked
        self._fetched: list[dict[str, np.ndarray]] = []  # checked, not yet logged
        self._timer: float | None = None
        self._timed_tokens, self._timed_steps = 0.0, 0
        self._untimed = 0  # steps fetched but excluded from the throughput (the compiling one)

    def add(self, metrics: dict[str, jax.Array], compiled_now: bool = False) -> None:
        if compiled_now:  # time from the end of the step that compiled
            jax.block_until_ready(metrics["loss"])
            self._timer, self._untimed = time.perf_counter(), self._untimed + 1
        self._pending.append(metrics)

    def wall_s(self) -> float:
        """Seconds since the run (this attempt of it) started, data preparation and compiling included."""
        return time.perf_counter() - self.started

    def check_finite(self, done: int) -> None:
        fetched = jax.device_get(self._pending)
        self._pending = []
        losses = np.array([m["loss"] for m in fetched])
        if not np.all(np.isfinite(losses)):
            raise TrainingDiverged(
                f"loss became {losses[~np.isfinite(losses)][0]} at or before step {done}; the last good checkpoint "
                f"is kept in {self.ckpt_dir}; lower optim.lr or set optim.clip_norm"
            )
        self._fetched.extend(fetched)

    def log(self, done: int) -> None:
        fetched, self._fetched = self._fetched, []
        timed, self._untimed = fetched[self._untimed:], 0
        self._timed_tokens += sum(float(m["tokens"]) for m in timed)
        self._timed_steps += len(timed)
        elapsed = time.perf_counter() - self._timer
        loss = float(np.mean([m["loss"] for m in fetched]))
        epoch = done / self.steps_per_epoch
        values = {"train/loss": loss, "train/grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
                  "train/epoch": epoch}
        line = f"step {done}/{self.total_steps} | epoch {epoch:.2f} | loss {loss:.4f}"
        if self._timed_steps:  # none yet when the first log step is the step that compiled
            tps = self._timed_tokens / max(elapsed, 1e-9)
            eta = elapsed / self._timed_steps * (self.total_steps - done)
            values["train/tokens_per_sec"] = tps
            line += f" | {tps:,.0f} tokens/s | eta {_format_eta(eta)}"
        self.writer.scalars(done, values)
        print(line, flush=True)


def _print_report(report: dict[str, float]) -> None:
    print(
        "parameters: embedding {e:,} | residual stack {s:,} | output {o:,} | total {t:,} ({b:,} bytes) | "
        "compression {r:.2f}x vs the uncompressed model ({bt:,})".format(
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
