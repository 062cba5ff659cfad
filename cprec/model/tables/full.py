"""The uncompressed item table: one ``[V, dim]`` row per item (``embed/embedding``, as ``nn.Embed``)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.model.tables.base import ItemTable


def full_param_count(num_items: int, dim: int, options: dict | None = None) -> int:
    return num_items * dim


class FullTable(ItemTable):
    """``embedding`` ``[V, dim]``, initialised N(0, 1/dim) so a row has norm about 1."""

    def setup(self) -> None:
        self.embedding = self.param("embedding", nn.initializers.normal(stddev=self.dim**-0.5),
                                    (self.num_items, self.dim))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0)

    def dense(self) -> jax.Array:
        return self.embedding

    def logits(self, h: jax.Array) -> jax.Array:
        return h @ self.embedding.T
