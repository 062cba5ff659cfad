"""Full-ranking evaluation over all items (never sampled negatives)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from cprec.eval.metrics import rank_metrics
from cprec.model.nextitnet import NextItNet, eval_ranks
from cprec.timing import median_seconds

if TYPE_CHECKING:
    from cprec.data import SequenceDataset


def make_rank_fn(model: NextItNet) -> Callable:
    """Jitted (params, inputs [B, L], targets [B]) -> 0-based ranks [B] over all real items."""

    @jax.jit
    def ranks(params, inputs, targets):
        log_prob = model.apply({"params": params}, inputs, method=NextItNet.last_log_prob)
        return eval_ranks(log_prob, targets)

    return ranks


def eval_users(num_users: int, limit: int) -> np.ndarray:
    """Indices of the users to evaluate: all of them, or a fixed sorted random subset of ``limit``.

    The subset depends only on (num_users, limit), so runs with different seeds or configs are
    scored on the same users.
    """
    if limit <= 0 or limit >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(0).choice(num_users, size=limit, replace=False))


def eval_splits(data: SequenceDataset, num_users: int, verbose: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The validation and test (inputs, targets) to score: every user's, or the fixed subset of `num_users`."""
    splits = {"val": (data.val_inputs, data.val_targets), "test": (data.test_inputs, data.test_targets)}
    users = eval_users(len(data.test_targets), num_users)
    if len(users) < len(data.test_targets):
        if verbose:
            print(f"evaluating a fixed subset of {len(users):,} of the {len(data.test_targets):,} users (eval.num_users)")
        splits = {name: (x[users], y[users]) for name, (x, y) in splits.items()}
    return splits


def evaluate_split(
    rank_fn: Callable, params, inputs: np.ndarray, targets: np.ndarray, batch_size: int, ks: Sequence[int],
    place: Callable[[np.ndarray], jax.Array] = jax.numpy.asarray,
    fetch: Callable[[jax.Array], np.ndarray] = np.asarray,
) -> dict[str, float]:
    """HR/NDCG/MRR@K over one split; the last batch is padded to keep one compiled shape.

    `place` puts a host batch on the devices (e.g. split over a data-parallel mesh) and `fetch`
    brings the ranks back to the host.
    """
    ranks = []
    for start in range(0, len(targets), batch_size):
        x = np.asarray(inputs[start : start + batch_size])
        y = np.asarray(targets[start : start + batch_size])
        n = len(y)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, x.shape[1]), x.dtype)])
            y = np.concatenate([y, np.ones(batch_size - n, y.dtype)])
        ranks.append(fetch(rank_fn(params, place(x), place(y)))[:n])
    return rank_metrics(np.concatenate(ranks), ks)


def topk_latency_ms(model: NextItNet, params, inputs: np.ndarray, n: int, batch_sizes: Sequence[int],
                    repeats: int = 5) -> dict[str, float]:
    """Median milliseconds of a jitted top-n recommendation (encoder + output layer's top_k) per batch size.

    For the tree softmax this is its exact early-stop search; for the full softmax, log-softmax
    over all items then `lax.top_k`.
    """
    # Parameter statistics the early stop uses are computed once, as a server would.
    stats = jax.jit(lambda p: model.apply({"params": p}, method=NextItNet.serving_stats))(params)
    fn = jax.jit(lambda p, s, x: model.apply({"params": p}, x, n, s, method=NextItNet.top_k)[:2])
    out = {}
    for b in batch_sizes:
        x = jax.numpy.asarray(np.resize(np.asarray(inputs[: max(b, 1)]), (b, inputs.shape[1])))
        seconds = median_seconds(lambda: fn(params, stats, x), repeats=repeats)  # the warm-up call compiles
        out[f"serve/top{n}_ms_batch{b}"] = 1000 * seconds
    return out
