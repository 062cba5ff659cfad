"""TT-Rec (Yin et al., MLSys 2021; facebookresearch/FBTT-Embedding): the item table as a tensor train.

V <= v1 v2 v3 and dim = d1 d2 d3 are factorised, and the ``[v1 v2 v3, d1 d2 d3]`` table is held as
three cores ``core_1`` ``[v1, d1, r]``, ``core_2`` ``[v2, r, d2, r]``, ``core_3`` ``[v3, r, d3]``
(TT ranks r1 = r2 = r, stored item-axis first so a lookup gathers rows): item i = (i1, i2, i3) in
row-major order gets the contraction ``core_1[i1] core_2[i2] core_3[i3]``, reshaped to dim. Full
scoring and the reconstructed table contract the cores as a train (``core_2`` with ``core_3`` once,
then each ``core_1[i1]`` with that: one block of v2 v3 rows per i1), never row by row: gathering a
``[r, d2, r]`` slice of ``core_2`` for every item costs about 30x more memory traffic than the
rows it builds.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.errors import ConfigError
from cprec.model.tables.base import ItemTable

# Row lookups contract core_2 with core_3 for every (i2, i3) once a lookup has at least
# v2 v3 / TAIL_FROM ids: the contraction costs about d3 per-id slices' worth per (i2, i3) pair.
TAIL_FROM = 4


def tt_item_shape(num_items: int) -> tuple[int, int, int]:
    """(v1, v2, v3): the smallest near-equal factors whose product holds V (v1 v2 v3 >= V)."""
    v = max(1, round(num_items ** (1 / 3)))
    while v ** 3 < num_items:
        v += 1
    v3 = -(-num_items // (v * v))
    return v, v, v3


def tt_dim_shape(dim: int) -> tuple[int, int, int]:
    """(d1, d2, d3) with d1 d2 d3 = dim, as equal as the divisors of dim allow (64 -> 4, 4, 4)."""
    best = (1, 1, dim)
    for a in range(1, dim + 1):
        for b in range(a, dim + 1):
            if dim % (a * b) == 0:
                c = dim // (a * b)
                if c >= b and c - a < best[2] - best[0]:
                    best = (a, b, c)
    return best


def tt_param_count(num_items: int, dim: int, options: dict) -> int:
    r = int(options["tt_rank"])
    (v1, v2, v3), (d1, d2, d3) = tt_item_shape(num_items), tt_dim_shape(dim)
    return v1 * d1 * r + v2 * r * d2 * r + v3 * r * d3


def tt_fit(budget: int, num_items: int, dim: int, options: dict) -> dict | None:
    """The largest TT rank whose cores fit ``budget`` parameters; None below rank 1."""
    count = lambda r: tt_param_count(num_items, dim, {"tt_rank": r})
    if count(1) > budget:
        return None
    r = 1
    while count(r + 1) <= budget and r < 4 * dim:
        r += 1
    return {**options, "tt_rank": r}


class TTTable(ItemTable):
    tt_rank: int = 0

    def setup(self) -> None:
        if self.tt_rank < 1:
            raise ConfigError(f"model.tt_rank={self.tt_rank} is invalid: give a TT rank >= 1, or a model.budget for "
                              f"the solver to choose it")
        (v1, v2, v3), (d1, d2, d3), r = tt_item_shape(self.num_items), tt_dim_shape(self.dim), self.tt_rank
        # A row's entries then have variance r * r * 1 * (1/r) * (1/(r dim)) = 1/dim, as the full table's.
        normal = nn.initializers.normal
        self.core_1 = self.param("core_1", normal(1.0), (v1, d1, r))
        self.core_2 = self.param("core_2", normal(r**-0.5), (v2, r, d2, r))
        self.core_3 = self.param("core_3", normal((r * self.dim) ** -0.5), (v3, r, d3))

    def __call__(self, ids: jax.Array) -> jax.Array:
        ids = jnp.asarray(ids)
        v2, v3 = self.core_2.shape[0], self.core_3.shape[0]
        a = jnp.take(self.core_1, ids // (v2 * v3), axis=0)  # [..., d1, r]
        if ids.size * TAIL_FROM >= v2 * v3:
            # Many ids (a training step's inputs, targets and negatives): contract the two last cores
            # once for every (i2, i3) and gather a [r, d2 d3] slice of that per id. Gathering a
            # [r, d2, r] slice of core_2 per id instead (and scattering its gradient back) moves r / d3
            # times more memory: 865 tokens/s at 1M items and r = 124.
            tail = jnp.take(self._tail_rows(), ids % (v2 * v3), axis=0)  # [..., r, d2 d3]
            rows = jnp.einsum("...ar,...rk->...ak", a, tail)
        else:  # a few ids (a session's events): the per-id slices cost less than the whole tail
            b = jnp.take(self.core_2, (ids // v3) % v2, axis=0)  # [..., r, d2, r]
            c = jnp.take(self.core_3, ids % v3, axis=0)  # [..., r, d3]
            rows = jnp.einsum("...ar,...rbs,...sc->...abc", a, b, c)
        return rows.reshape(*ids.shape, self.dim)

    def _tail_rows(self) -> jax.Array:
        """``core_2`` contracted with ``core_3``: ``[v2 v3, r, d2 d3]``, shared by every ``core_1[i1]``."""
        v2, r, d2, _ = self.core_2.shape
        v3, _, d3 = self.core_3.shape
        return jnp.einsum("yrbs,zsc->yzrbc", self.core_2, self.core_3).reshape(v2 * v3, r, d2 * d3)

    def dense(self) -> jax.Array:
        rows = jnp.einsum("xar,nrk->xnak", self.core_1, self._tail_rows())  # [v1, v2 v3, d1, d2 d3]
        return rows.reshape(-1, self.dim)[: self.num_items]

    def scoring_table(self) -> jax.Array:
        # Rebuilding the rows costs r / N times the scoring of N hidden states (16 GFLOP at 1M items and
        # r = 124): evaluation and serving build them once per set of parameters.
        return self.dense()

    def logits(self, h: jax.Array) -> jax.Array:
        """``h E^T``, one block of v2 v3 rows (one first-core index) at a time."""
        tail = self._tail_rows()
        block = lambda a: h @ jnp.einsum("ar,nrk->nak", a, tail).reshape(-1, self.dim).T  # [N, v2 v3]
        scores = jax.lax.map(block, self.core_1)  # [v1, N, v2 v3]
        return jnp.moveaxis(scores, 0, 1).reshape(h.shape[0], -1)[:, : self.num_items]
