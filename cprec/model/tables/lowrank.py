"""Low-rank item table (ALBERT's factorised embedding, Lan et al., ICLR 2020): ``E = A B``.

``factors`` A ``[V, r]`` holds an r-vector per item and ``proj`` B ``[r, dim]`` maps it to the
model's width; the same rank for every item (CpRec's block-wise table varies it by popularity).
Scores never form E: ``h E^T = (h B^T) A^T``, ``r`` multiply-adds per item instead of ``dim``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.errors import ConfigError
from cprec.model.tables.base import ItemTable


def lowrank_param_count(num_items: int, dim: int, options: dict) -> int:
    r = int(options["rank"])
    return num_items * r + r * dim


def lowrank_fit(budget: int, num_items: int, dim: int, options: dict) -> dict | None:
    """The largest rank in [1, dim] whose table has at most ``budget`` parameters (None: not even rank 1)."""
    r = min(dim, budget // (num_items + dim))
    return {**options, "rank": int(r)} if r >= 1 else None


class LowRankTable(ItemTable):
    rank: int = 0

    def setup(self) -> None:
        if not 1 <= self.rank <= self.dim:
            raise ConfigError(f"model.rank={self.rank} is invalid for the low-rank table: give a rank in [1, "
                              f"dim={self.dim}], or a model.budget for the solver to choose it")
        # A row of A B then has variance r * (1/r) * (1/dim) = 1/dim, as the full table's.
        self.factors = self.param("factors", nn.initializers.normal(stddev=self.rank**-0.5),
                                  (self.num_items, self.rank))
        self.proj = self.param("proj", nn.initializers.normal(stddev=self.dim**-0.5), (self.rank, self.dim))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.factors, ids, axis=0) @ self.proj

    def dense(self) -> jax.Array:
        return self.factors @ self.proj

    def logits(self, h: jax.Array) -> jax.Array:
        return (h @ self.proj.T) @ self.factors.T
