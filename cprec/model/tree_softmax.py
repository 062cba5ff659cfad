"""Block-wise (two-level tree) softmax over frequency-ordered items, as in CpRec / adaptive softmax.

Clusters come from ``cutoffs = (k1, ..., V)`` (see ``cprec.model.clusters``): the head holds ids
``[0, k1)`` and tail cluster j = 1..n-1 holds ids ``[cutoffs[j-1], cutoffs[j])`` (offset_j =
``cutoffs[j-1]``, size k_j, rank d_j = ``ranks[j]``).

Parameter layout (no biases), for loading weights:

- ``head``: ``[dim, k1 + n - 1]``. Columns ``0..k1-1`` score the head items; column
  ``k1 + j - 1`` is the token of tail cluster j.
- ``tail_{j}_proj``: ``[dim, d_j]`` and ``tail_{j}_out``: ``[d_j, k_j]`` for j = 1..n-1; the
  logits of cluster j's items are ``h @ tail_{j}_proj @ tail_{j}_out``.
- Tied to a ``BlockwiseEmbedding`` (see ``BlockwiseSoftmax``): ``tokens`` ``[dim, n - 1]`` instead
  of ``head``, no ``tail_{j}_out`` (and no ``tail_{j}_proj`` with ``tie_projections``); with
  ``projection``, ``proj/kernel`` ``[dim, dim]`` and ``proj/bias`` ``[dim]`` map h first.

Semantics: ``log p(x) = log_softmax(h @ head)[x]`` for ``x < k1``, and
``log_softmax(h @ head)[k1 + j - 1] + log_softmax(h @ P_j @ W_j)[x - offset_j]`` for x in cluster j.

Costs: ``loss`` computes the head for every token and cluster j only for the tokens whose target
lies in it: in a static buffer of ``capacities[j-1]`` rows (an exact chunked fallback runs when a
batch routes more), or, without capacities, in the smallest of 64, 128, 256, ... rows that holds
them; big low-rank clusters are streamed in cache-sized column blocks. ``top_k`` is exact and
scores a tail cluster only for the rows whose cluster token beats their current n-th best item
(p(item in j) <= p(token_j), tightened by a bound from the cluster's weight statistics, given or
derived on first need), gathering those rows into a buffer of 1, 4, 16, ... rows.
Measured against a full softmax by ``python -m cprec.bench.tree_softmax``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cprec.errors import ConfigError
from cprec.model.clusters import check_clusters
from cprec.model.output import InputProjection
from cprec.model.xent import (block_logits, block_width, column_blocks, log_softmax, lse, online_lse, row_xent,
                        softmax_xent, use_blocks)

Initializer = Callable[..., jax.Array]



# ----------------------------------------------------------------------------------------------
# Exact top-n helpers for the early-stop search (forward only).

def _top_n(x: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` over the last axis of [R, K], cheaper for long rows, same result up to ties.

    The n best entries lie in the n groups (of 16 columns) with the largest maxima, so a top-n
    over the group maxima and one over those n*16 candidates replace a top-n over all K columns.
    """
    rows, k = x.shape
    group = 16  # columns per group: small enough that n*16 candidates stay few, large enough to cut K 16x
    if k < 64 * n:
        return lax.top_k(x, n)
    main = k - k % group
    group_max = jnp.max(x[:, :main].reshape(rows, main // group, group), axis=2)
    _, best = lax.top_k(group_max, n)
    cand_cols = (best[:, :, None] * group + jnp.arange(group, dtype=best.dtype)).reshape(rows, -1)
    if main < k:
        rest = jnp.broadcast_to(jnp.arange(main, k, dtype=best.dtype), (rows, k - main))
        cand_cols = jnp.concatenate([cand_cols, rest], axis=1)
    vals, pos = lax.top_k(jnp.take_along_axis(x, cand_cols, axis=1), n)
    return vals, jnp.take_along_axis(cand_cols, pos, axis=1)


def _merge_top_n(vals, ids, new_vals, new_ids, n):
    vals, pos = lax.top_k(jnp.concatenate([vals, new_vals], axis=1), n)
    return vals, jnp.take_along_axis(jnp.concatenate([ids, new_ids], axis=1), pos, axis=1)


def _cluster_top_n(z: jax.Array, w: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-n logits of ``z @ w`` per row, their columns, and the rows' logsumexp (>= every logit)."""
    rows, k = z.shape[0], w.shape[1]
    if not use_blocks(rows, z.shape[1], k):
        logits = z @ w
        vals, ids = _top_n(logits, n)
        return vals, ids.astype(jnp.int32), lse(logits)
    width = block_width(rows, k)
    blocks = column_blocks(w, width)
    n_blk = min(n, width)

    def body(carry, inp):
        m, s, vals, ids = carry
        b, w_blk = inp
        logits = block_logits(z, w_blk, b, width, k)
        m, s = online_lse(m, s, logits)
        new_vals, new_ids = _top_n(logits, n_blk)
        vals, ids = _merge_top_n(vals, ids, new_vals, new_ids.astype(jnp.int32) + b * width, n)
        return (m, s, vals, ids), None

    init = (jnp.full((rows,), -jnp.inf, z.dtype), jnp.zeros((rows,), z.dtype),
            jnp.full((rows, n), -jnp.inf, z.dtype), jnp.full((rows, n), -1, jnp.int32))
    (m, s, vals, ids), _ = lax.scan(body, init, (jnp.arange(blocks.shape[0], dtype=jnp.int32), blocks))
    return vals, ids, m + jnp.log(s)


# ----------------------------------------------------------------------------------------------
# Tail cluster: summed NLL of the rows routed to it (sel), computed on a static buffer of
# `capacity` rows. On overflow an exact scan over capacity-sized chunks runs instead; it is
# rematerialised so its backward keeps no [capacity, k_j] residual per chunk, and chunks past the
# routed rows are skipped by a cond (forward and backward).

def _compact(sel: jax.Array, size: int, start: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """Row ids of the selected rows number start..start+size-1 (in row order) and their validity.

    A cumsum and one scatter: no sort, no data-dependent shapes. Unused slots point at row 0.
    """
    n = sel.shape[0]
    sel_i = sel.astype(jnp.int32)
    pos = jnp.cumsum(sel_i) - 1 - start
    slot = jnp.where(sel & (pos >= 0) & (pos < size), pos, size)
    idx = jnp.zeros((size,), jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    valid = jnp.arange(size, dtype=jnp.int32) + start < jnp.sum(sel_i)
    return idx, valid


def _tail_chunk_nll(h, proj, out, local_t, sel, capacity, start):
    idx, valid = _compact(sel, capacity, start)
    nll = softmax_xent(h[idx] @ proj, out, local_t[idx])
    return jnp.sum(jnp.where(valid, nll, 0.0))


def _tail_nll_chunks(h: jax.Array, proj: jax.Array, out: jax.Array, local_t: jax.Array,
                     sel: jax.Array, chunk: int) -> jax.Array:
    """Sum over rows with ``sel`` of -log_softmax(h @ proj @ out)[row, local_t], ``chunk`` routed rows at a time.

    Chunks past the routed rows are skipped (forward and backward), so the cost follows the
    routed count whatever it is; each chunk is rematerialised, so the backward keeps no
    [chunk, k_j] residual per chunk but recomputes the chunk's forward.
    """
    count = jnp.sum(sel.astype(jnp.int32))

    @jax.checkpoint
    def body(acc, c):
        start = c * chunk
        part = lax.cond(start < count,
                        lambda: _tail_chunk_nll(h, proj, out, local_t, sel, chunk, start),
                        lambda: jnp.zeros((), h.dtype))
        return acc + part, None
    n_chunks = -(-h.shape[0] // chunk)
    return lax.scan(body, jnp.zeros((), h.dtype), jnp.arange(n_chunks, dtype=jnp.int32))[0]


def _tail_nll_sum(h: jax.Array, proj: jax.Array, out: jax.Array, local_t: jax.Array,
                  sel: jax.Array, capacity: int) -> jax.Array:
    """Sum over rows with ``sel`` of -log_softmax(h @ proj @ out)[row, local_t] in a ``capacity``-row buffer.

    A batch that routes more rows than ``capacity`` takes the exact chunked path instead.
    """
    n_rows = h.shape[0]
    if capacity >= n_rows:
        return _tail_chunk_nll(h, proj, out, local_t, sel, n_rows, 0)
    count = jnp.sum(sel.astype(jnp.int32))
    return lax.cond(count > capacity, lambda: _tail_nll_chunks(h, proj, out, local_t, sel, capacity),
                    lambda: _tail_chunk_nll(h, proj, out, local_t, sel, capacity, 0))


def _tail_nll_bucketed(h: jax.Array, proj: jax.Array, out: jax.Array, local_t: jax.Array,
                       sel: jax.Array) -> jax.Array:
    """``_tail_nll_sum`` with no capacity: a buffer of 64, 128, 256, ... rows, the smallest that fits the batch.

    One ``lax.switch`` over static sizes, so the cost follows the routed count whatever the item
    frequencies are. Each branch is rematerialised: the switch then keeps only its inputs for the
    backward (not every branch's [size, k_j] residuals), at the price of the chosen branch's
    forward running again in the backward.
    """
    sizes = _row_buckets(h.shape[0], first=64, factor=2)
    count = jnp.sum(sel.astype(jnp.int32))

    def branch(size: int) -> Callable:
        return jax.checkpoint(lambda h, proj, out: _tail_chunk_nll(h, proj, out, local_t, sel, size, 0))
    idx = jnp.sum(count > jnp.asarray(sizes[:-1], jnp.int32)).astype(jnp.int32)
    return lax.switch(idx, [branch(size) for size in sizes], h, proj, out)


# ----------------------------------------------------------------------------------------------
# Pure functions on the parameter arrays (the module below only fetches its params).

def _bounds(cutoffs: Sequence[int]) -> tuple[int, ...]:
    return (0,) + tuple(int(c) for c in cutoffs)


def tree_log_prob(head: jax.Array, projs: Sequence[jax.Array], outs: Sequence[jax.Array],
                  cutoffs: Sequence[int], h: jax.Array) -> jax.Array:
    """Full log distribution ``[N, V]`` (see the module docstring for the parameters)."""
    k1 = _bounds(cutoffs)[1]
    head_lp = log_softmax(h @ head)
    parts = [head_lp[:, :k1]]
    for j, (p, w) in enumerate(zip(projs, outs)):
        parts.append(head_lp[:, k1 + j, None] + log_softmax((h @ p) @ w))
    return jnp.concatenate(parts, axis=1)


def tree_loss(head: jax.Array, projs: Sequence[jax.Array], outs: Sequence[jax.Array],
              cutoffs: Sequence[int], capacities: Sequence[int] | None,
              h: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact mean NLL over rows with ``mask`` true, and their number."""
    bounds = _bounds(cutoffs)
    k1, n_rows = bounds[1], h.shape[0]
    targets = targets.astype(jnp.int32)
    mask = mask.astype(bool)
    cluster = jnp.sum(targets[:, None] >= jnp.asarray(bounds[1:-1], jnp.int32)[None, :], axis=1)
    # Masked rows may hold any id (padding, -1): clip so every gather stays in range.
    head_col = jnp.clip(jnp.where(cluster == 0, targets, k1 + cluster - 1), 0, head.shape[1] - 1)
    total = jnp.sum(jnp.where(mask, row_xent(h, head, head_col), 0.0))
    for j, (p, w) in enumerate(zip(projs, outs), start=1):
        local_t = jnp.clip(targets - bounds[j], 0, w.shape[1] - 1)
        sel = mask & (cluster == j)
        if capacities is None:
            total = total + _tail_nll_bucketed(h, p, w, local_t, sel)
        else:
            cap = max(1, min(int(capacities[j - 1]), n_rows))
            total = total + _tail_nll_sum(h, p, w, local_t, sel, cap)
    count = jnp.sum(mask.astype(jnp.int32))
    return total / jnp.maximum(count, 1).astype(total.dtype), count


def _row_buckets(n_rows: int, first: int = 1, factor: int = 4) -> tuple[int, ...]:
    """Static buffer sizes for the rows that need a cluster: first, first * factor, ..., n_rows.

    In ``top_k``, growing by 4 keeps the compiled branches few (log4 of the batch per cluster)
    while a buffer wastes at most 3/4 of its rows; by 2 would double the branches for little less
    padding. ``loss`` grows by 2 from 64: its buffers are the training step's main tail cost.
    """
    sizes, b = [], first
    while b < n_rows:
        sizes.append(b)
        b *= factor
    return tuple(sizes) + (n_rows,)


ClusterStats = tuple[tuple[jax.Array, ...], ...]

# Absolute and relative slack on the cluster bound: float32 rounding of the computed log-probs must
# never let a skipped cluster hold an item that beats the n-th best. Slack only expands more.
_BOUND_SLACK = (1e-3, 1e-4)


def matmul_input_roundoff() -> float:
    """Unit roundoff of the inputs of a float32 matmul at the precision in use (traced code reads it).

    XLA runs a float32 matmul at the backend's default precision unless told otherwise: float32 on
    CPUs, TF32 (10 mantissa bits) on NVIDIA GPUs since Ampere, bfloat16 passes on TPUs. The early
    stop's bound must hold for the log-probs as they are computed, so its slack grows with this.
    """
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    if precision in ("float32", "highest"):
        return 2.0**-24
    if precision in ("bfloat16", "fastest"):
        return 2.0**-8
    if precision in ("tensorfloat32", "high"):
        return 2.0**-11
    return {"gpu": 2.0**-11, "cuda": 2.0**-11, "rocm": 2.0**-11, "tpu": 2.0**-8}.get(jax.default_backend(), 2.0**-24)


def _matmul_slack(z: jax.Array, stats: tuple[jax.Array, ...]) -> jax.Array:
    """How far rounded matmul inputs can move the bound's comparison, per row: >= 0.

    With inputs rounded to unit roundoff u, a computed logit z.w_i moves by at most
    e = (2u + d_j 2^-24) sum_d |z_d w_di| <= e_max = (2u + d_j 2^-24) sum_d |z_d| max(|max_i W[d,i]|, |min_i W[d,i]|).
    An item's computed log-prob is its logit minus the cluster's computed logsumexp, which is at least
    log k + mean_i(logit_i) - e_max, and the bound's own Jensen term z.mean_i(w_i) is a matmul too:
    3 e_max covers all three; 4 e_max leaves a margin.
    """
    w_max, w_min = stats[0], stats[1]
    eps = 2.0 * matmul_input_roundoff() + z.shape[1] * 2.0**-24
    return 4.0 * eps * jnp.sum(jnp.abs(z) * jnp.maximum(jnp.abs(w_max), jnp.abs(w_min)), axis=1)


def tree_cluster_stats(outs: Sequence[jax.Array]) -> ClusterStats:
    """Per tail cluster: row-wise max, min and mean of ``W_j`` [d_j, k_j] and its largest column norm.

    They depend on the parameters only (a server computes them once per model) and give ``top_k``
    a per-row upper bound on the best item log-prob of each cluster (see ``_cluster_bound``).
    """
    return tuple(_weight_stats(w) for w in outs)


def _weight_stats(w: jax.Array) -> tuple[jax.Array, ...]:
    # One variadic reduction for max / min / sum along the items (a single read of W), and the
    # column norms as a sum of the d_j rows: XLA's CPU reduction over the short leading axis of a
    # wide [d_j, k_j] array strides across memory, these passes read it contiguously.
    lo = jnp.asarray(-jnp.inf, w.dtype)
    w_max, w_min, w_sum = lax.reduce((w, w, w), (lo, -lo, jnp.zeros((), w.dtype)),
                                     lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1]), a[2] + b[2]),
                                     (1,))
    sq = w[0] * w[0]
    for row in range(1, w.shape[0]):
        sq = sq + w[row] * w[row]
    return w_max, w_min, w_sum / w.shape[1], jnp.sqrt(jnp.max(sq))


def _cluster_bound(z: jax.Array, stats: tuple[jax.Array, ...], k: int) -> jax.Array:
    """Upper bound on ``max_i log_softmax(z @ W)[i]`` per row, from ``tree_cluster_stats``; <= 0.

    max_i z.w_i <= sum_d max(z_d max_i W[d,i], z_d min_i W[d,i]) and <= |z| max_i |w_i| (exact for
    rank 1); logsumexp_i z.w_i >= log k + z.mean_i w_i (Jensen). A flat model's big clusters fall
    far below their token's log-prob: every item there shares the token's mass with k-1 others.
    The bound holds for the log-probs as the platform's matmuls compute them (``_matmul_slack``).
    """
    w_max, w_min, w_mean, col_norm = stats
    best = jnp.minimum(jnp.sum(jnp.maximum(z * w_max, z * w_min), axis=1), jnp.linalg.norm(z, axis=1) * col_norm)
    return jnp.minimum(best - (jnp.log(float(k)) + z @ w_mean) + _matmul_slack(z, stats), 0.0)


def _tightened(tok_lp: jax.Array, bound: jax.Array) -> jax.Array:
    """Upper bound on the best item log-prob of a cluster: its token's log-prob plus ``bound`` (with slack).

    The token's own log-prob stays a bound without slack: the computed item log-probs never exceed it.
    """
    return jnp.minimum(tok_lp, tok_lp + bound + _BOUND_SLACK[0] + _BOUND_SLACK[1] * jnp.abs(tok_lp + bound))


# Without precomputed statistics, top_k derives a cluster's statistics (one pass over W_j) only once
# this many rows need that cluster; fewer rows are cheaper to score than to bound.
_LAZY_STATS_ROWS = 8


def tree_top_k(head: jax.Array, projs: Sequence[jax.Array], outs: Sequence[jax.Array],
               cutoffs: Sequence[int], h: jax.Array, n: int,
               stats: ClusterStats | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exact top-n log-probs and ids per row with early stop, and the expanded clusters.

    Tail cluster j is expanded for a row only while an upper bound on its best item's log-prob
    (its token's log-prob, tightened by ``_cluster_bound``) beats the row's n-th best so far.
    ``stats`` = ``tree_cluster_stats(outs)``, computed here when not given. Padding (id 0) is
    never returned. See ``tree_recommend`` for exclusions and a cluster budget.
    """
    scores, ids, expanded, _ = tree_recommend(head, projs, outs, cutoffs, h, n, stats)
    return scores, ids, expanded


def tree_recommend(head: jax.Array, projs: Sequence[jax.Array], outs: Sequence[jax.Array],
                   cutoffs: Sequence[int], h: jax.Array, n: int, stats: ClusterStats | None = None,
                   exclude: jax.Array | None = None, max_clusters: jax.Array | None = None,
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``tree_top_k`` with per-row exclusions and a per-row budget of tail clusters.

    ``exclude`` [N, E] int: item ids each row must not get (e.g. its history; -1 = none). They
    score -inf, so every bound stays an upper bound and the result stays exact: a cluster returns
    its top n + E items, of which at most E are excluded. ``max_clusters`` [N] int: a row expands
    at most this many tail clusters, its most promising ones by their initial bound (the order
    does not depend on the other rows). Returns ``(scores, ids, expanded, exact)``; ``exact[r]``
    says no unexpanded cluster could still change row r's top-n (always true without a budget).
    """
    bounds = _bounds(cutoffs)
    k1, n_rows, n_tail = bounds[1], h.shape[0], len(projs)
    if not 1 <= n <= bounds[-1]:
        raise ConfigError(f"top_k: n must be in [1, V={bounds[-1]}], got {n}")
    head_lp = log_softmax(h @ head)
    tok_lp = head_lp[:, k1:]
    zs = [h @ p for p in projs]
    sizes = [w.shape[1] for w in outs]
    lazy = stats is None
    if lazy:  # token bounds now; a cluster's statistics only once enough rows reach it (see _LAZY_STATS_ROWS)
        item_ub = tok_lp
    else:
        item_ub = _tightened(tok_lp, jnp.stack([_cluster_bound(z, st, k) for z, st, k in zip(zs, stats, sizes)], axis=1))
    head_items = head_lp[:, :k1].at[:, 0].set(-jnp.inf)  # padding is never recommended
    n_excl = 0 if exclude is None else exclude.shape[1]
    if n_excl:
        exclude = exclude.astype(jnp.int32)
        in_head = jnp.where((exclude >= 0) & (exclude < k1), exclude, k1)  # k1: out of range, dropped
        head_items = head_items.at[jnp.arange(n_rows)[:, None], in_head].set(-jnp.inf, mode="drop")
    m = min(n, k1)
    scores, ids = _top_n(head_items, m)
    ids = ids.astype(jnp.int32)
    if m < n:
        scores = jnp.pad(scores, ((0, 0), (0, n - m)), constant_values=-jnp.inf)
        ids = jnp.pad(ids, ((0, 0), (0, n - m)), constant_values=-1)

    buckets = _row_buckets(n_rows)

    def make_branch(j: int, size: int) -> Callable:
        lo, z_j, w = bounds[j + 1], zs[j], outs[j]
        n_j = min(n + n_excl, w.shape[1])

        def branch(rows: jax.Array, tok_j: jax.Array) -> tuple[jax.Array, jax.Array]:
            idx, valid = _compact(rows, size)
            vals, i, lse = _cluster_top_n(z_j[idx], w, n_j)
            s = tok_j[idx][:, None] + (vals - lse[:, None])  # same rounding as tree_log_prob
            got = n_j
            if n_excl:  # drop the excluded among the n + E best, keep the n best of the rest
                hit = jnp.any(i[:, :, None] == (exclude[idx] - lo)[:, None, :], axis=2)
                s = jnp.where(hit, -jnp.inf, s)
                if got > n:
                    s, pos = lax.top_k(s, n)
                    i = jnp.take_along_axis(i, pos, axis=1)
                    got = n
            if got < n:
                s = jnp.pad(s, ((0, 0), (0, n - got)), constant_values=-jnp.inf)
                i = jnp.pad(i, ((0, 0), (0, n - got)), constant_values=-1 - lo)
            dest = jnp.where(valid, idx, n_rows)  # dropped: rows that do not need cluster j
            new_s = jnp.full((n_rows, n), -jnp.inf, s.dtype).at[dest].set(s, mode="drop")
            new_i = jnp.full((n_rows, n), -1, jnp.int32).at[dest].set(i.astype(jnp.int32) + lo, mode="drop")
            return new_s, new_i
        return branch

    branches = [make_branch(j, b) for j in range(n_tail) for b in buckets]
    bucket_sizes = jnp.asarray(buckets, jnp.int32)
    # Lazy statistics of cluster j (one pass over W_j): the bound of every row for that cluster.
    bound_branches = [lambda tok_j, j=j: _tightened(tok_j, _cluster_bound(zs[j], _weight_stats(outs[j]), sizes[j]))
                      for j in range(n_tail)]
    refining = lazy and n_rows >= _LAZY_STATS_ROWS  # static: else no cluster could ever be refined

    if max_clusters is None:
        allowed = jnp.ones((n_rows, n_tail), bool)
    else:  # each row's own most promising clusters, ranked by their initial bound (ties by index)
        order = jnp.argsort(-item_ub, axis=1, stable=True)
        rank = jnp.zeros((n_rows, n_tail), jnp.int32).at[jnp.arange(n_rows)[:, None], order].set(
            jnp.arange(n_tail, dtype=jnp.int32)[None, :])
        allowed = rank < jnp.asarray(max_clusters, jnp.int32).reshape(-1, 1)

    def needs(scores, visited, item_ub):
        return (item_ub > scores[:, n - 1:n]) & ~visited[None, :] & allowed

    def cond(state):
        scores, _, visited, _, item_ub, _ = state
        return jnp.any(needs(scores, visited, item_ub))

    def expand(state, j, rows):
        scores, ids, visited, expanded, item_ub, bounded = state
        bucket = jnp.sum(jnp.sum(rows.astype(jnp.int32)) > bucket_sizes).astype(jnp.int32)
        new_s, new_i = lax.switch(j * len(buckets) + bucket, branches, rows, jnp.take(tok_lp, j, axis=1))
        scores, ids = _merge_top_n(scores, ids, new_s, new_i, n)
        return scores, ids, visited.at[j].set(True), expanded.at[:, j].set(rows), item_ub, bounded

    def tighten(state, j, rows):
        scores, ids, visited, expanded, item_ub, bounded = state
        ub_j = lax.switch(j, bound_branches, jnp.take(tok_lp, j, axis=1))
        return scores, ids, visited, expanded, item_ub.at[:, j].set(ub_j), bounded.at[j].set(True)

    def body(state):
        scores, _, visited, _, item_ub, bounded = state
        need = needs(scores, visited, item_ub)
        # Next: the cluster with the highest bound among the rows that still need one.
        j = jnp.argmax(jnp.max(jnp.where(need, item_ub, -jnp.inf), axis=0)).astype(jnp.int32)
        rows = jnp.take(need, j, axis=1)
        if not refining:
            return expand(state, j, rows)
        # Few rows: scoring the cluster costs about what its statistics would, so score it.
        refine = ~bounded[j] & (jnp.sum(rows.astype(jnp.int32)) >= _LAZY_STATS_ROWS)
        return lax.cond(refine, tighten, expand, state, j, rows)

    init = (scores, ids, jnp.zeros((n_tail,), bool), jnp.zeros((n_rows, n_tail), bool), item_ub,
            jnp.full((n_tail,), not refining))
    scores, ids, _, expanded, item_ub, _ = lax.while_loop(cond, body, init)
    # The n-th best only rises, so a cluster once below it stays below: these are the ones skipped for budget.
    exact = ~jnp.any((item_ub > scores[:, n - 1:n]) & ~expanded, axis=1)
    return scores, ids, expanded, exact



def _cluster_lse(z: jax.Array, w: jax.Array) -> jax.Array:
    """logsumexp of ``z @ w`` per row, streamed in column blocks for big low-rank clusters."""
    rows, k = z.shape[0], w.shape[1]
    if not use_blocks(rows, z.shape[1], k):
        return lse(z @ w)
    width = block_width(rows, k)

    def body(carry, inp):
        b, w_blk = inp
        return online_lse(*carry, block_logits(z, w_blk, b, width, k)), None

    blocks = column_blocks(w, width)
    init = (jnp.full((rows,), -jnp.inf, z.dtype), jnp.zeros((rows,), z.dtype))
    (m, s), _ = lax.scan(body, init, (jnp.arange(blocks.shape[0], dtype=jnp.int32), blocks))
    return m + jnp.log(s)


def tree_score(head: jax.Array, projs: Sequence[jax.Array], outs: Sequence[jax.Array],
               cutoffs: Sequence[int], h: jax.Array, candidates: jax.Array) -> jax.Array:
    """Exact log-probs ``[N, M]`` of M candidate ids per row (ids outside [1, V) score -inf).

    Computes the head once and, per tail cluster, its normaliser only when a candidate of the
    batch falls in it (a ``lax.cond``); the candidates' logits are read from that normaliser's
    logits, or, for batches too large to hold them, from one gathered column per candidate: the
    cost of a ranking stage that scores a few candidates after retrieval, and never more than a
    full ``log_prob`` (no ``[N, V]`` result is written).
    """
    bounds = _bounds(cutoffs)
    k1 = bounds[1]
    c = candidates.astype(jnp.int32)
    valid = (c > 0) & (c < bounds[-1])
    head_lp = log_softmax(h @ head)
    cluster = jnp.sum(c[..., None] >= jnp.asarray(bounds[1:-1], jnp.int32), axis=-1)  # 0 = head
    out = jnp.take_along_axis(head_lp, jnp.clip(c, 0, k1 - 1), axis=1)
    for j, (p, w) in enumerate(zip(projs, outs), start=1):
        in_j = valid & (cluster == j)
        z = h @ p
        local = jnp.clip(c - bounds[j], 0, w.shape[1] - 1)
        if use_blocks(z.shape[0], w.shape[0], w.shape[1]):
            # Too many rows to hold the cluster's logits: stream its normaliser, gather the candidates' columns.
            norm = lax.cond(jnp.any(in_j), lambda z=z, w=w: _cluster_lse(z, w),
                            lambda z=z: jnp.zeros(z.shape[:1], z.dtype))
            logit = jnp.einsum("nd,dnm->nm", z, jnp.take(w, local, axis=1))  # [d_j, N, M] columns
        else:
            # The normaliser computes every logit of the cluster anyway: read the candidates' from them
            # (no column gather per candidate, so a hit cluster costs what a full log_prob pays for it).
            def hit(z=z, w=w, local=local):
                logits = z @ w
                return lse(logits), jnp.take_along_axis(logits, local, axis=1)
            norm, logit = lax.cond(jnp.any(in_j), hit, lambda z=z: (jnp.zeros(z.shape[:1], z.dtype),
                                                                     jnp.zeros(local.shape, z.dtype)))
        out = jnp.where(in_j, head_lp[:, k1 + j - 1, None] + logit - norm[:, None], out)
    return jnp.where(valid, out, -jnp.inf)

# ----------------------------------------------------------------------------------------------

class BlockwiseSoftmax(InputProjection, nn.Module):
    """Two-level tree softmax over V items; see the module docstring for layout and semantics.

    ``capacities``: static token capacity of each tail cluster in ``loss`` (e.g. from
    ``cprec.model.clusters.cluster_token_capacities`` and the training item counts). None (the default)
    assumes nothing about the frequencies: each call routes a cluster's tokens into the smallest
    of 64, 128, 256, ... rows that holds them (one ``lax.switch``, rematerialised): a little slower
    than tuned capacities, which save the recompute and compile fewer branches (docs/benchmarks.md).

    Tied (``tied_to`` a ``BlockwiseEmbedding`` with the same clusters; Baevski and Auli's adaptive
    input/softmax tying, fairseq's ``tie_adaptive_weights``): the head's item columns are the
    embedding's head table transposed and ``tail_{j}_out`` is its ``tail_{j}_emb`` transposed; only
    the cluster tokens' columns stay this layer's own (``tokens`` [dim, n - 1]). With
    ``tie_projections`` (``tie_adaptive_proj``) ``tail_{j}_proj`` is the embedding's transposed too.
    ``projection`` adds ``h' = W h + b`` (``proj``, d x d) before everything.
    """

    dim: int
    num_items: int
    cutoffs: tuple[int, ...]
    ranks: tuple[int, ...]
    capacities: tuple[int, ...] | None = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    param_dtype: Any = jnp.float32
    tied_to: Any = None  # a BlockwiseEmbedding over the same cutoffs and ranks
    tie_projections: bool = False
    projection: bool = False

    def setup(self) -> None:
        check_clusters(self.num_items, self.dim, self.cutoffs, self.ranks, require_tail=True)
        n = len(self.cutoffs)
        if self.capacities is not None and (
                len(self.capacities) != n - 1 or any(int(c) < 1 for c in self.capacities)):
            raise ConfigError(
                f"model.capacities needs one token capacity >= 1 per tail cluster ({n - 1}), got {self.capacities}")
        tied = self.tied_to
        if tied is not None and (tuple(tied.cutoffs), tuple(tied.ranks)) != (tuple(self.cutoffs), tuple(self.ranks)):
            raise ConfigError(f"a tied tree softmax needs the embedding's clusters: cutoffs {tied.cutoffs} and ranks "
                              f"{tied.ranks}, got {self.cutoffs} and {self.ranks}")
        if self.tie_projections and tied is None:
            raise ConfigError("model.tie_projections needs model.tie_embeddings=True (the projections are tied "
                              "along with the item tables)")
        self.setup_projection()
        bounds = _bounds(self.cutoffs)
        if tied is None:
            self.head = self.param("head", self.kernel_init, (self.dim, bounds[1] + n - 1), self.param_dtype)
        else:
            self.tokens = self.param("tokens", self.kernel_init, (self.dim, n - 1), self.param_dtype)
        projs, outs = [], []
        for j in range(1, n):
            d, k = self.ranks[j], bounds[j + 1] - bounds[j]
            if not self.tie_projections:
                projs.append(self.param(f"tail_{j}_proj", self.kernel_init, (self.dim, d), self.param_dtype))
            if tied is None:
                outs.append(self.param(f"tail_{j}_out", self.kernel_init, (d, k), self.param_dtype))
        self.own_proj, self.own_out = projs, outs

    def tables(self) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
        """``(head [dim, k1 + n - 1], tail projections [dim, d_j], tail outputs [d_j, k_j])``, tied or not."""
        tied = self.tied_to
        head = self.head if tied is None else jnp.concatenate([tied.head.T, self.tokens], axis=1)
        projs = [p.T for p in tied.tail_proj] if self.tie_projections else list(self.own_proj)
        outs = list(self.own_out) if tied is None else [e.T for e in tied.tail_emb]
        return head, projs, outs

    def _flat(self, h: jax.Array) -> jax.Array:
        h = jnp.asarray(h)
        return self.project(h.reshape(-1, self.dim).astype(jnp.promote_types(h.dtype, self.param_dtype)))

    def log_prob(self, h: jax.Array, stats: ClusterStats | None = None) -> jax.Array:
        """``h`` [N, dim] (or [..., dim], flattened) -> log p over all V ids, ``[N, V]``; ``stats`` is unused
        (a full ranking bounds no clusters)."""
        return tree_log_prob(*self.tables(), self.cutoffs, self._flat(h))

    def loss(self, h: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean NLL of ``targets`` over rows where ``mask`` is true, and that row count (int32).

        Leading dims of ``h`` / ``targets`` / ``mask`` are flattened. Never builds ``[N, V]``.
        """
        return tree_loss(*self.tables(), self.cutoffs, self.capacities,
                         self._flat(h), jnp.reshape(targets, (-1,)), jnp.reshape(mask, (-1,)))

    def cluster_stats(self) -> ClusterStats:
        """Statistics of the tail weights that ``top_k`` bounds clusters with; compute once per model."""
        return tree_cluster_stats(self.tables()[2])

    def top_k(self, h: jax.Array, n: int, stats: ClusterStats | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Exact top-n: ``(log-probs [N, n] descending, ids [N, n], expanded [N, n_tail] bool)``.

        ``expanded[r, j-1]`` says whether tail cluster j was scored for row r. Equals
        ``lax.top_k(log_prob(h), n)`` up to ties and float rounding. Without ``stats`` a cluster's
        weight statistics are derived inside the call only once 8 or more rows reach its token
        test (fewer rows are cheaper to score than to bound); ``stats`` from ``cluster_stats()``,
        computed once per model, let even a single row skip a cluster it cannot win.
        """
        return tree_top_k(*self.tables(), self.cutoffs, self._flat(h), n, stats)

    def recommend(self, h: jax.Array, n: int, stats: ClusterStats | None = None, exclude: jax.Array | None = None,
                  max_clusters: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``top_k`` with per-row excluded ids [N, E] (-1 = none) and cluster budgets [N]; adds ``exact`` [N]."""
        return tree_recommend(*self.tables(), self.cutoffs, self._flat(h), n, stats, exclude, max_clusters)

    def score(self, h: jax.Array, candidates: jax.Array, stats: ClusterStats | None = None) -> jax.Array:
        """Exact log-probs [N, M] of candidate ids [N, M], without a full ``log_prob`` (see ``tree_score``);
        ``stats`` is unused."""
        return tree_score(*self.tables(), self.cutoffs, self._flat(h), candidates)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.log_prob(h)
