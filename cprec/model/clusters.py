"""Frequency clusters of item ids for the block-wise embedding and the tree softmax.

Item ids are ordered by descending training frequency (id 0 = padding). ``V`` counts every id,
padding included. Clusters are contiguous id ranges given by boundaries ``(k1, k1+k2, ..., V)``:
cluster 0 (the head) holds ids ``[0, k1)``, cluster j holds ``[cutoffs[j-1], cutoffs[j])``.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import numpy as np

from cprec.errors import ConfigError, DataError

CutoffSpec = Sequence[Union[int, float]]
RankSpec = Union[Sequence[int], int, float]


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def resolve_cutoffs(spec: CutoffSpec, num_items: int, require_tail: bool = False) -> tuple[int, ...]:
    """Turns ``model.cutoffs`` into cluster boundaries ending with ``num_items`` (= V).

    ``spec`` holds either absolute id boundaries (``[2000, 10000]``) or fractions of V in (0, 1)
    (``[0.05, 0.2]``); V is appended. An empty spec gives one cluster ``(V,)``.
    ``require_tail``: the tree softmax needs at least one tail cluster.
    """
    if not _is_int(num_items) or num_items < 2:
        raise ConfigError(f"model.cutoffs: the vocabulary size V must be an integer >= 2, got {num_items!r}")
    V = int(num_items)
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ConfigError(
            f"model.cutoffs must be a list of ids in (0, {V}) or of fractions in (0, 1), got {spec!r}")
    values = list(spec)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
        raise ConfigError(f"model.cutoffs must be a list of numbers, got {spec!r}")
    fractions = [v for v in values if not _is_int(v) and not float(v).is_integer()]
    if fractions:
        if len(fractions) != len(values):
            raise ConfigError(f"model.cutoffs mixes fractions and id counts ({spec!r}); "
                              f"use only ids in (0, {V}) or only fractions in (0, 1)")
        bad = [v for v in values if not 0.0 < float(v) < 1.0]
        if bad:
            raise ConfigError(f"model.cutoffs fractions must lie in (0, 1), got {bad[0]!r} in {spec!r}")
        cuts = [int(round(float(v) * V)) for v in values]
    else:
        cuts = [int(v) for v in values]
    for c in cuts:
        if c <= 0:
            raise ConfigError(f"model.cutoffs must be > 0 (valid range: 0 < cutoff < V = {V}), got {spec!r}")
        if c >= V:
            raise ConfigError(
                f"model.cutoffs {spec!r} do not fit the vocabulary: every cutoff must be < V = {V} "
                f"(number of item ids including padding); lower the cutoffs or use fractions")
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            where = f" (fractions {spec!r} give {cuts})" if fractions else ""
            raise ConfigError(f"model.cutoffs must be strictly increasing in (0, {V}), got {spec!r}{where}")
    if require_tail and not cuts:
        raise ConfigError(f"model.cutoffs must give at least one tail cluster for the tree softmax, "
                          f"e.g. [{max(1, V // 10)}]; got {spec!r}")
    return tuple(cuts) + (V,)


def resolve_ranks(spec: RankSpec, dim: int, num_clusters: int) -> tuple[int, ...]:
    """Embedding rank per cluster, the head's first (always ``dim``).

    ``spec`` is an explicit list with one rank per cluster (``model.ranks``), or a decay factor
    f >= 1 (``model.rank_decay``): ``d_j = max(1, dim // f**j)`` for cluster j = 0..n-1 (CpRec uses 4).
    """
    if not _is_int(dim) or dim < 1:
        raise ConfigError(f"model.dim must be an integer >= 1, got {dim!r}")
    if not _is_int(num_clusters) or num_clusters < 1:
        raise ConfigError(f"model.cutoffs must give at least one cluster, got {num_clusters!r} clusters")
    if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        f = float(spec)
        if not (math.isfinite(f) and f >= 1.0):
            raise ConfigError(f"model.rank_decay must be a number >= 1 (d_j = dim // rank_decay**j), got {spec!r}")
        return tuple(max(1, int(dim // f ** j)) for j in range(num_clusters))
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ConfigError(f"model.ranks must be a list of {num_clusters} integers in [1, {dim}], got {spec!r}")
    ranks = list(spec)
    if len(ranks) != num_clusters:
        raise ConfigError(f"model.ranks needs one rank per cluster ({num_clusters} clusters from "
                          f"model.cutoffs), got {len(ranks)}: {spec!r}")
    for r in ranks:
        if not _is_int(r) or not 1 <= r <= dim:
            raise ConfigError(f"model.ranks must be integers in [1, dim={dim}], got {r!r} in {spec!r}")
    if ranks[0] != dim:
        raise ConfigError(f"model.ranks[0] (the head cluster) must equal dim={dim}, got {ranks[0]!r}")
    return tuple(int(r) for r in ranks)


def check_frequency_order(item_counts: Sequence[int] | np.ndarray) -> None:
    """Raises DataError unless ``item_counts[1:]`` is non-increasing (id 0 = padding is ignored)."""
    counts = np.asarray(item_counts)
    if counts.ndim != 1:
        raise DataError(f"item counts must be a 1-d array indexed by item id, got shape {counts.shape}")
    rest = counts[1:]
    bad = np.nonzero(rest[1:] > rest[:-1])[0]
    if bad.size:
        i = int(bad[0]) + 1
        raise DataError(
            f"item ids are not frequency-ordered (id {i} has count {rest[i - 1]} < id {i + 1} count {rest[i]}); "
            f"prepare the data with cprec.data (it re-indexes by frequency)")


def cluster_token_capacities(
    item_counts: Sequence[int] | np.ndarray,
    cutoffs: Sequence[int],
    tokens_per_batch: int,
    margin: float = 1.5,
) -> tuple[int, ...]:
    """Static token capacity of each tail cluster for ``BlockwiseSoftmax.loss``.

    Capacity of cluster j = its share of training target tokens (from ``item_counts``, padding
    excluded) * ``tokens_per_batch`` * ``margin``, rounded up to a multiple of 8 (at least 8) and
    capped at ``tokens_per_batch``. A batch routing more tokens takes the exact (slower) fallback.
    """
    counts = np.asarray(item_counts, dtype=np.float64)
    cutoffs = tuple(int(c) for c in cutoffs)
    if counts.ndim != 1 or counts.shape[0] != cutoffs[-1]:
        raise ConfigError(f"model.cutoffs end at V={cutoffs[-1]} but the item counts hold {counts.shape[0]} ids")
    if not _is_int(tokens_per_batch) or tokens_per_batch < 1:
        raise ConfigError(f"tokens_per_batch must be an integer >= 1, got {tokens_per_batch!r}")
    if not margin > 0:
        raise ConfigError(f"model.capacity_margin must be > 0, got {margin!r}")
    total = counts[1:].sum()
    caps = []
    for lo, hi in zip(cutoffs[:-1], cutoffs[1:]):
        share = counts[lo:hi].sum() / total if total > 0 else 1.0
        # Multiples of 8 rows: whole SIMD/sublane tiles for the gathered [capacity, d] matmuls.
        cap = 8 * max(1, math.ceil(share * tokens_per_batch * margin / 8))
        caps.append(int(min(cap, tokens_per_batch)))
    return tuple(caps)


def check_clusters(num_items: int, dim: int, cutoffs: Sequence[int], ranks: Sequence[int],
                   require_tail: bool = False) -> None:
    """Validates already resolved ``cutoffs`` (ending with V) and ``ranks`` given to a module."""
    cutoffs = tuple(cutoffs)
    if not cutoffs or cutoffs[-1] != num_items:
        raise ConfigError(
            f"model.cutoffs must end with V = num_items = {num_items} once resolved, got {cutoffs}")
    resolve_cutoffs(cutoffs[:-1], num_items, require_tail=require_tail)
    if tuple(ranks) != resolve_ranks(tuple(ranks), dim, len(cutoffs)):
        raise ConfigError(f"model.ranks must be integers in [1, dim={dim}], got {tuple(ranks)}")
