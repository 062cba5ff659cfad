"""RecJPQ (Petrov and Macdonald, WSDM 2024; reference code asash/RecJPQ): items as tuples of shared sub-item codes.

The ``dim`` dimensions are split into m contiguous sub-spaces (widths differ by at most one, so m
need not divide ``dim``). Each item holds m codes, one per sub-space, each naming one of c centroids;
an item's vector is the concatenation of its centroids' slices. ``centroids`` ``[c, dim]`` holds the
c centroids of every sub-space side by side (sub-space k owns columns ``[s_k, e_k)``), so a lookup
is one gather per dimension. Scores of every item need no reconstructed table: for each sub-space,
``h[:, s_k:e_k] @ centroids[:, s_k:e_k]^T`` gives the c sub-scores, and an item's score is the sum
of its m gathered sub-scores (for a few hidden states; for many, blocks of rebuilt rows are faster).

Codes are fixed before training and never trained (the paper's joint product quantisation trains
the centroids only). ``jpq_assign='svd'`` (the paper's default): a truncated SVD of the training
user-item matrix with m components, and for each component the items split into c equal-count bins
by their loading (``svd_codes``); ``'random'``: uniform codes from the seed. The codes live in the
parameter tree (``codes``) so checkpoints, exports and servers carry them, as float32 values that
pack ``24 // bits(c)`` codes each (3 codes of 8 bits at c = 256: exact in a float32's 24-bit
mantissa); the model reads them through ``stop_gradient`` and no optimizer or weight decay changes
them (``cprec.model.param_groups.FROZEN``). Their storage counts in the parameter budget.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cprec.errors import ConfigError
from cprec.model.tables.base import SCORE_BLOCK, ItemTable

JPQ_ASSIGN = ("svd", "random")
_MANTISSA_BITS = 24  # integers below 2**24 are exact in float32
# Up to this many hidden states, scores are gathered sums of sub-scores (m adds per item and row,
# no table rebuilt); beyond it the gathers' memory traffic (V m N floats) loses to rebuilding blocks
# of rows and one matmul each (docs/rivals.md has the measurement).
GATHER_ROWS = 16


def codes_per_float(centroids: int) -> int:
    """How many codes of ``centroids`` values one float32 holds exactly (3 at c = 256)."""
    return max(1, _MANTISSA_BITS // max(1, math.ceil(math.log2(centroids))))


def packed_width(splits: int, centroids: int) -> int:
    """float32 values per item holding its ``splits`` codes."""
    return -(-splits // codes_per_float(centroids))


def split_bounds(dim: int, splits: int) -> list[tuple[int, int]]:
    """The m sub-spaces' [start, end) columns: contiguous, widths differing by at most one."""
    edges = [round(k * dim / splits) for k in range(splits + 1)]
    return list(zip(edges[:-1], edges[1:]))


def jpq_param_count(num_items: int, dim: int, options: dict) -> int:
    m, c = int(options["jpq_splits"]), int(options.get("jpq_centroids", 256))
    return c * dim + num_items * packed_width(m, c)


def jpq_fit(budget: int, num_items: int, dim: int, options: dict) -> dict | None:
    """The most sub-spaces m in [1, dim] whose centroids and packed codes fit ``budget``; None below m = 1.
    (A budget above the m = dim table's size gets that table: one code per dimension is RecJPQ's largest.)"""
    count = lambda m: jpq_param_count(num_items, dim, {**options, "jpq_splits": m})
    if count(1) > budget:
        return None
    m = 1
    while m < dim and count(m + 1) <= budget:
        m += 1
    return {**options, "jpq_splits": m}


def pack_codes(codes: np.ndarray, centroids: int) -> np.ndarray:
    """``[V, m]`` integer codes -> ``[V, packed_width]`` float32 (base-c digits, lowest first)."""
    codes = np.asarray(codes, np.int64)
    per = codes_per_float(centroids)
    width = packed_width(codes.shape[1], centroids)
    padded = np.zeros((codes.shape[0], width * per), np.int64)
    padded[:, : codes.shape[1]] = codes
    digits = padded.reshape(codes.shape[0], width, per)
    return (digits * centroids ** np.arange(per)).sum(-1).astype(np.float32)


def unpack_codes(packed: jax.Array, splits: int, centroids: int) -> jax.Array:
    """The inverse of ``pack_codes``: ``[..., packed_width]`` float32 -> ``[..., splits]`` int32."""
    per = codes_per_float(centroids)
    x = packed.astype(jnp.int32)[..., None]
    digits = (x // (centroids ** jnp.arange(per, dtype=jnp.int32))) % centroids
    return digits.reshape(*packed.shape[:-1], -1)[..., :splits]


def _windows_matrix(windows: np.ndarray, num_items: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, cols) of the binary window-by-item matrix of the training windows (each a row), and its row count."""
    windows = np.asarray(windows)
    rows = np.repeat(np.arange(windows.shape[0]), windows.shape[1])
    cols = windows.reshape(-1).astype(np.int64)
    keep = (cols > 0) & (cols < num_items)
    pairs = np.unique(rows[keep] * num_items + cols[keep])
    return pairs // num_items, pairs % num_items, int(windows.shape[0])


def svd_codes(windows: np.ndarray, num_items: int, splits: int, centroids: int, seed: int = 0,
              oversample: int = 10, power_iterations: int = 4) -> np.ndarray:
    """RecJPQ's SVD assignment: ``[V, m]`` codes from the training windows ``[N, L+1]`` (id 0 = padding).

    The binary window-by-item matrix A (a user's windows are its rows) gets a rank-m truncated SVD
    (randomized, Halko et al. 2011: ``oversample`` extra columns, ``power_iterations`` rounds, the
    seed's Gaussian start); component k's item loadings, signs fixed so the largest is positive,
    split the items into c equal-count bins by rank (ties by id), and bin b is code b of sub-space k.
    """
    rows, cols, num_rows = _windows_matrix(windows, num_items)
    k = splits + oversample

    def a_times(x):  # A @ x, x [V, k]
        return jax.ops.segment_sum(x[cols], rows, num_segments=num_rows)

    def at_times(y):  # A^T @ y, y [rows, k]
        return jax.ops.segment_sum(y[rows], cols, num_segments=num_items)

    rng = np.random.default_rng(seed)
    q = jnp.linalg.qr(a_times(jnp.asarray(rng.standard_normal((num_items, k)), jnp.float32)))[0]
    for _ in range(power_iterations):
        q = jnp.linalg.qr(a_times(jnp.linalg.qr(at_times(q))[0]))[0]
    b = at_times(q).T  # Q^T A, [k, V]
    loadings = np.asarray(jnp.linalg.svd(b, full_matrices=False)[2][:splits], np.float64)  # [m', V]
    if loadings.shape[0] < splits:  # fewer components than sub-spaces (a tiny matrix): repeat them
        loadings = np.resize(loadings, (splits, num_items))
    codes = np.empty((num_items, splits), np.int64)
    ids = np.arange(num_items)
    for j, loading in enumerate(loadings):
        loading = loading * np.sign(loading[np.argmax(np.abs(loading))])
        rank = np.empty(num_items, np.int64)
        rank[np.lexsort((ids, loading))] = ids
        codes[:, j] = rank * centroids // num_items
    return codes


def random_codes(num_items: int, splits: int, centroids: int, seed: int) -> np.ndarray:
    """Uniform ``[V, m]`` codes from ``seed`` (the ``jpq_assign='random'`` option)."""
    return np.random.default_rng(seed).integers(0, centroids, (num_items, splits))


class JPQTable(ItemTable):
    jpq_splits: int = 0
    jpq_centroids: int = 256
    jpq_assign: str = "svd"

    def setup(self) -> None:
        if not 1 <= self.jpq_splits <= self.dim:
            raise ConfigError(f"model.jpq_splits={self.jpq_splits} is invalid: give a sub-space count in [1, "
                              f"dim={self.dim}], or a model.budget for the solver to choose it")
        if self.jpq_centroids < 2:
            raise ConfigError(f"model.jpq_centroids={self.jpq_centroids} is invalid: give at least 2 centroids "
                              f"per sub-space (RecJPQ uses 256)")
        if self.jpq_assign not in JPQ_ASSIGN:
            raise ConfigError(f"model.jpq_assign={self.jpq_assign!r} is invalid; valid choices: {', '.join(JPQ_ASSIGN)}")
        c, m = self.jpq_centroids, self.jpq_splits
        # An item's vector then has variance 1/dim per entry, as the full table's rows.
        self.centroids = self.param("centroids", nn.initializers.normal(stddev=self.dim**-0.5), (c, self.dim))

        def init_codes(key, shape):  # random codes; training replaces them by the SVD's (``assign_codes``)
            seed = jax.random.randint(key, (), 0, 2**31 - 1)
            codes = jax.random.randint(jax.random.key(seed), (self.num_items, m), 0, c)
            per = codes_per_float(c)
            padded = jnp.zeros((self.num_items, shape[1] * per), jnp.int32).at[:, :m].set(codes)
            return (padded.reshape(self.num_items, shape[1], per) * c ** jnp.arange(per)).sum(-1).astype(jnp.float32)

        self.codes = self.param("codes", init_codes, (self.num_items, packed_width(m, c)))
        bounds = split_bounds(self.dim, m)
        # The sub-space of each dimension, for one-gather lookups.
        self._split_of_dim = np.repeat(np.arange(m), [e - s for s, e in bounds])
        self._bounds = bounds

    def item_codes(self, ids: jax.Array) -> jax.Array:
        """``[..., m]`` int32 codes of ``ids``."""
        packed = jax.lax.stop_gradient(jnp.take(self.codes, jnp.asarray(ids), axis=0))
        return unpack_codes(packed, self.jpq_splits, self.jpq_centroids)

    def __call__(self, ids: jax.Array) -> jax.Array:
        per_dim = jnp.take(self.item_codes(ids), self._split_of_dim, axis=-1)  # [..., dim]
        return jnp.asarray(self.centroids)[per_dim, jnp.arange(self.dim)]

    def logits(self, h: jax.Array) -> jax.Array:
        if h.shape[0] > GATHER_ROWS:  # many rows: rows of the table in blocks, one matmul each (base class)
            return super().logits(h)
        # The m * c sub-scores, item-major ([m c, N]: a gathered row is contiguous), then per block of
        # ids the sum of each item's m gathered rows; [block, m, N] at a time, never [V, m, N].
        c = self.jpq_centroids
        sub = jnp.concatenate([self.centroids[:, s:e] @ h[:, s:e].T for s, e in self._bounds])  # [m c, N]
        block = min(SCORE_BLOCK, self.num_items)
        num_blocks = -(-self.num_items // block)
        ids = jnp.minimum(jnp.arange(num_blocks * block, dtype=jnp.int32), self.num_items - 1)
        offsets = c * jnp.arange(self.jpq_splits, dtype=jnp.int32)
        rows = lambda b: jnp.take(sub, self.item_codes(b) + offsets, axis=0).sum(axis=1)  # [block, N]
        scores = jax.lax.map(rows, ids.reshape(num_blocks, block))  # [blocks, block, N]
        return scores.reshape(-1, h.shape[0])[: self.num_items].T


def assign_codes(params: dict, codes: np.ndarray, centroids: int) -> dict:
    """``params`` with its JPQ table's codes (``embed/codes``) replaced by ``codes`` ``[V, m]``."""
    embed = dict(params["embed"])
    packed = pack_codes(codes, centroids)
    if embed["codes"].shape != packed.shape:
        raise ValueError(f"codes of shape {packed.shape} do not fit the table's {embed['codes'].shape}")
    embed["codes"] = jnp.asarray(packed)
    return {**params, "embed": embed}
