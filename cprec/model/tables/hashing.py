"""The hashing trick (Weinberger et al., ICML 2009): item i's vector is row ``hash(i) mod m`` of ``rows`` ``[m, dim]``.

Every compression study reports it as the floor: items that collide share one vector, so with
tied outputs they also get the same score (the table cannot tell them apart at ranking time).
The hash is fixed (no parameters, no seed): Knuth's multiplicative constant on uint32 with an
xor-shift to mix the high bits down, so consecutive (frequency-ordered) ids spread evenly.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.errors import ConfigError
from cprec.model.tables.base import ItemTable

_MULTIPLIER = 0x9E3779B1  # 2^32 / golden ratio


def hash_bucket(ids: jax.Array, rows: int) -> jax.Array:
    """The row of each id: ``mix(id * 0x9E3779B1 mod 2^32) mod rows`` (int32, same shape)."""
    x = jnp.asarray(ids).astype(jnp.uint32) * jnp.uint32(_MULTIPLIER)
    x = x ^ (x >> 16)
    return (x % jnp.uint32(rows)).astype(jnp.int32)


def hash_param_count(num_items: int, dim: int, options: dict) -> int:
    return int(options["hash_rows"]) * dim


def hash_fit(budget: int, num_items: int, dim: int, options: dict) -> dict | None:
    """The most rows (at most V) that fit ``budget`` parameters; None below one row."""
    m = min(num_items, budget // dim)
    return {**options, "hash_rows": int(m)} if m >= 1 else None


class HashTable(ItemTable):
    hash_rows: int = 0

    def setup(self) -> None:
        if not 1 <= self.hash_rows <= self.num_items:
            raise ConfigError(f"model.hash_rows={self.hash_rows} is invalid: give a row count in [1, V="
                              f"{self.num_items}], or a model.budget for the solver to choose it")
        self.rows = self.param("rows", nn.initializers.normal(stddev=self.dim**-0.5), (self.hash_rows, self.dim))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.rows, hash_bucket(ids, self.hash_rows), axis=0)

    def logits(self, h: jax.Array) -> jax.Array:
        # m scores per row, then one gather: the items of a row score alike.
        return jnp.take(h @ self.rows.T, hash_bucket(jnp.arange(self.num_items), self.hash_rows), axis=1)
