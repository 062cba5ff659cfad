"""Full-ranking evaluation over all items (never sampled negatives)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from cprec.errors import EvaluationError
from cprec.eval.metrics import rank_metrics
from cprec.model.sequential import SequentialRecommender
from cprec.timing import median_seconds

if TYPE_CHECKING:
    from cprec.data import SequenceDataset


def eval_ranks(scores: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """0-based rank of each target among all real items (padding id 0 excluded), and whether the row's
    scores are all finite.

    Ties count against the target (pessimistic): every other real item scoring at least as high ranks
    above it, so a model with constant scores ranks every target last, never first. A NaN compares
    false with everything and would rank its target first; ``check_finite_rows`` refuses such rows.
    """
    real = scores[:, 1:]
    target = jnp.take_along_axis(scores, targets[:, None], axis=-1)
    ranks = jnp.sum(real >= target, axis=-1) - 1  # minus the target itself
    return ranks, jnp.all(jnp.isfinite(real), axis=-1)


def check_finite_rows(finite: np.ndarray, split: str, step: int | None) -> None:
    """Raises EvaluationError, naming the split, the step and the count, when a row had a NaN or infinite score."""
    bad = int(np.size(finite) - np.count_nonzero(finite))
    if bad:
        at = f"step {step}" if step is not None else "an unknown step"
        raise EvaluationError(
            f"{bad:,} of {np.size(finite):,} rows of the {split} split have NaN or infinite scores (parameters of "
            f"{at}); no metrics written: evaluate an earlier checkpoint, or retrain with a lower optim.lr")


def make_rank_fn(model: SequentialRecommender) -> Callable:
    """params -> a jitted (inputs [B, L], targets [B]) -> (0-based ranks [B] over all real items, finite [B]).

    What the output layer reuses across batches (``serving_stats``: a TT-Rec table's rows) is computed
    once per params, not once per batch.
    """
    stats_fn = jax.jit(lambda params: model.apply({"params": params}, method="serving_stats"))

    @jax.jit
    def ranks(params, stats, inputs, targets):
        log_prob = model.apply({"params": params}, inputs, stats, method="last_log_prob")
        return eval_ranks(log_prob, targets)

    def bind(params) -> Callable:
        stats = stats_fn(params)
        return lambda inputs, targets: ranks(params, stats, inputs, targets)

    return bind


def eval_users(num_users: int, limit: int) -> np.ndarray:
    """Indices of the users to evaluate: all of them, or a fixed sorted random subset of ``limit``.

    The subset depends only on (num_users, limit), so runs with different seeds or configs are
    scored on the same users.
    """
    if limit <= 0 or limit >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(0).choice(num_users, size=limit, replace=False))


def eval_splits(data: SequenceDataset, num_users: int,
                verbose: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The validation and test (inputs, targets) to score: every row, or a fixed subset of `num_users` rows
    of each split (the same users in both under leave-one-out, where each user has one row per split)."""
    splits = {"val": (data.val_inputs, data.val_targets), "test": (data.test_inputs, data.test_targets)}
    subsets = []
    for name, (x, y) in splits.items():
        users = eval_users(len(y), num_users)
        if len(users) < len(y):
            subsets.append(f"{len(users):,} of the {len(y):,} {name} users")
            splits[name] = (x[users], y[users])
    if verbose and subsets:
        same = len(data.val_targets) == len(data.test_targets)  # leave-one-out: one row per user in each
        print("evaluating a fixed subset of " + (subsets[0].replace(" val users", " users") if same else
                                                 ", ".join(subsets)) + " (eval.num_users)")
    return splits


def evaluate_split(
    rank_fn: Callable[..., Callable], params, inputs: np.ndarray, targets: np.ndarray, batch_size: int, ks: Sequence[int],
    place: Callable[[np.ndarray], jax.Array] = jax.numpy.asarray,
    fetch: Callable[[jax.Array], np.ndarray] = np.asarray,
    split: str = "evaluated", step: int | None = None,
) -> dict[str, float]:
    """HR/NDCG/MRR@K over one split; the last batch is padded to keep one compiled shape.

    `place` puts a host batch on the devices (e.g. split over a data-parallel mesh) and `fetch`
    brings the ranks back to the host. A row with a NaN or infinite score is an EvaluationError
    naming `split` and `step` (the parameters' training step), raised before any metric exists.
    """
    ranks, finite = [], []
    rank = rank_fn(params)
    for start in range(0, len(targets), batch_size):
        x = np.asarray(inputs[start : start + batch_size])
        y = np.asarray(targets[start : start + batch_size])
        n = len(y)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, x.shape[1]), x.dtype)])
            y = np.concatenate([y, np.ones(batch_size - n, y.dtype)])
        r, f = rank(place(x), place(y))
        ranks.append(fetch(r)[:n])
        finite.append(fetch(f)[:n])
    check_finite_rows(np.concatenate(finite), split, step)
    return rank_metrics(np.concatenate(ranks), ks)


def topk_latency_ms(model: SequentialRecommender, params, inputs: np.ndarray, n: int, batch_sizes: Sequence[int],
                    repeats: int = 5) -> dict[str, float]:
    """Median milliseconds of a jitted top-n recommendation (encoder + output layer's top_k) per batch size.

    For the tree softmax this is its exact early-stop search; for the full softmax, log-softmax
    over all items then `lax.top_k`.
    """
    # Parameter statistics the early stop uses are computed once, as a server would.
    stats = jax.jit(lambda p: model.apply({"params": p}, method="serving_stats"))(params)
    fn = jax.jit(lambda p, s, x: model.apply({"params": p}, x, n, s, method="top_k")[:2])
    out = {}
    for b in batch_sizes:
        x = jax.numpy.asarray(np.resize(np.asarray(inputs[: max(b, 1)]), (b, inputs.shape[1])))
        seconds = median_seconds(lambda: fn(params, stats, x), repeats=repeats)  # the warm-up call compiles
        out[f"serve/top{n}_ms_batch{b}"] = 1000 * seconds
    return out
