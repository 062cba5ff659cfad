"""The uncompressed output layer: one [dim, V] weight and a full softmax.

It has the interface of ``cprec.model.output.OutputLayer``, as `BlockwiseSoftmax` does, so the
model can swap one for the other. Tied (``tied_to`` the input embedding, any item table of
``cprec.model.tables``), the weight is that table, ``logits = h' E^T``, as in SASRec, BERT4Rec and
the common PyTorch NextItNet; a compressed table scores through its own factors (``ItemTable.logits``)
and is reconstructed only for the training loss. ``projection`` adds ``h' = W h + b`` (a d x d
dense layer, ``proj``) before it.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.model.output import InputProjection
from cprec.model.tables import ItemTable
from cprec.model.xent import row_xent


class FullSoftmax(InputProjection, nn.Module):
    """Full softmax over all V item ids (id 0 = padding is a column but never a target).

    Parameters: ``kernel`` [dim, V] (none when ``tied_to`` the input embedding) and, with
    ``projection``, ``proj/kernel`` [dim, dim] and ``proj/bias`` [dim].
    """

    dim: int
    num_items: int
    tied_to: ItemTable | None = None  # share the input embedding's item table
    projection: bool = False  # a dense d x d layer with bias on h first

    def setup(self) -> None:
        self.setup_projection()
        if self.tied_to is None:
            self.kernel = self.param(
                "kernel", nn.initializers.normal(stddev=self.dim**-0.5), (self.dim, self.num_items)
            )

    def _weight(self) -> jax.Array:
        """The ``[dim, V]`` weight (a tied compressed table reconstructed: the training loss's only use)."""
        return self.kernel if self.tied_to is None else self.tied_to.dense().T

    def logits(self, h: jax.Array, stats: jax.Array | None = None) -> jax.Array:
        """[N, dim] -> [N, V] scores; ``stats``: ``cluster_stats()``, the tied table's scoring table if it keeps one."""
        hp = self.project(h)
        if self.tied_to is None:
            return hp @ self.kernel
        return self.tied_to.logits(hp) if stats is None else hp @ stats.T

    def log_prob(self, h: jax.Array, stats: jax.Array | None = None) -> jax.Array:
        """[N, dim] -> [N, V] log-probabilities."""
        return jax.nn.log_softmax(self.logits(h, stats), axis=-1)

    def loss(self, h: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean negative log-likelihood over the tokens where mask is true, and their count (int32)."""
        # Fused kernel with a hand-written backward: no [N, V] cotangent (matters at large V).
        nll = row_xent(self.project(h), self._weight(), targets)
        count = jnp.sum(mask.astype(jnp.int32))
        return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(count, 1).astype(nll.dtype), count

    def cluster_stats(self) -> jax.Array | None:
        """What ``log_prob`` and ``top_k`` reuse across calls (interface of ``BlockwiseSoftmax``): the tied
        table's ``scoring_table()`` (TT-Rec's rebuilt rows), else None."""
        return None if self.tied_to is None else self.tied_to.scoring_table()

    def top_k(self, h: jax.Array, n: int, stats: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Top-n ``(log-probs, ids, expanded)`` over real items (padding excluded); ``stats``: ``cluster_stats()``.

        ``expanded`` is ``[N, 0]``: a full softmax has no tail clusters to skip.
        """
        scores, ids, expanded, _ = self.recommend(h, n, stats)
        return scores, ids, expanded

    def recommend(self, h: jax.Array, n: int, stats: jax.Array | None = None, exclude: jax.Array | None = None,
                  max_clusters: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``top_k`` without the ids in ``exclude`` [N, E] (-1 = none); always exact (no clusters to budget)."""
        lp = self.log_prob(h, stats).at[:, 0].set(-jnp.inf)
        if exclude is not None and exclude.shape[1]:
            rows = jnp.arange(lp.shape[0])[:, None]
            lp = lp.at[rows, jnp.where(exclude >= 0, exclude, lp.shape[1])].set(-jnp.inf, mode="drop")
        scores, ids = jax.lax.top_k(lp, n)
        return scores, ids.astype(jnp.int32), jnp.zeros((lp.shape[0], 0), bool), jnp.ones((lp.shape[0],), bool)

    def score(self, h: jax.Array, candidates: jax.Array, stats: jax.Array | None = None) -> jax.Array:
        """Log-probs [N, M] of candidate ids [N, M] (ids outside [1, V) score -inf); ``stats``: ``cluster_stats()``."""
        c = candidates.astype(jnp.int32)
        lp = jnp.take_along_axis(self.log_prob(h, stats), jnp.clip(c, 0, self.num_items - 1), axis=1)
        return jnp.where((c > 0) & (c < self.num_items), lp, -jnp.inf)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.log_prob(h)
