"""Full-ranking metrics from the 0-based rank of the true item among all items."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """HR@K, NDCG@K and MRR@K averaged over users.

    With r the 0-based rank: HR@K = [r < K], MRR@K = 1/(r+1), NDCG@K = 1/log2(r+2),
    each 0 when r >= K (one relevant item per user, so IDCG = 1).
    """
    r = np.asarray(ranks, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError("rank_metrics needs a non-empty 1-D array of ranks")
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (r + 1.0), 0.0).mean())
    return out


def popularity_ranks(item_counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Ranks of the targets under the most-popular baseline, ties counted against the target as for
    every model (``cprec.eval.evaluate.eval_ranks``): every other real item with at least the target's
    training count ranks above it."""
    counts = np.asarray(item_counts, dtype=np.int64)
    sorted_counts = np.sort(counts[1:])  # real items only: padding is never ranked
    return len(sorted_counts) - np.searchsorted(sorted_counts, counts[targets], side="left") - 1
