"""The uncompressed output layer: one [dim, V] weight and a full softmax.

It has the same interface as `BlockwiseSoftmax` (log_prob / loss / top_k) so the
model can swap one for the other.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.xent import row_xent


class FullSoftmax(nn.Module):
    """Full softmax over all V item ids (id 0 = padding is a column but never a target)."""

    dim: int
    num_items: int

    def setup(self) -> None:
        self.kernel = self.param(
            "kernel", nn.initializers.normal(stddev=self.dim**-0.5), (self.dim, self.num_items)
        )

    def logits(self, h: jax.Array) -> jax.Array:
        return h @ self.kernel

    def log_prob(self, h: jax.Array) -> jax.Array:
        """[N, dim] -> [N, V] log-probabilities."""
        return jax.nn.log_softmax(self.logits(h), axis=-1)

    def loss(self, h: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean negative log-likelihood over the tokens where mask is true, and their count."""
        # Fused kernel with a hand-written backward: no [N, V] cotangent (matters at large V).
        nll = row_xent(h, self.kernel, targets)
        mask = mask.astype(nll.dtype)
        count = mask.sum()
        return (nll * mask).sum() / jnp.maximum(count, 1.0), count

    def cluster_stats(self) -> None:
        """Nothing to precompute for a full ranking (interface of ``BlockwiseSoftmax``)."""
        return None

    def top_k(self, h: jax.Array, n: int, stats: None = None) -> tuple[jax.Array, jax.Array]:
        """Top-n (scores, ids) over real items (padding excluded); ``stats`` is unused."""
        lp = self.log_prob(h).at[:, 0].set(-jnp.inf)
        return jax.lax.top_k(lp, n)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.log_prob(h)
