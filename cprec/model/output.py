"""The interface every output layer of NextItNet has (``FullSoftmax``, ``BlockwiseSoftmax``)."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax


@runtime_checkable
class OutputLayer(Protocol):
    """Scores the next item from hidden states ``h`` ``[N, dim]`` over V item ids (id 0 = padding).

    The same return types for every layer, so code written against one works with the other.
    """

    def log_prob(self, h: jax.Array, stats: Any = None) -> jax.Array:
        """``[N, V]`` log-probabilities (normalised over all V ids); ``stats`` from ``cluster_stats()``."""
        ...

    def loss(self, h: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean NLL of ``targets`` ``[N]`` over the rows where ``mask`` is true, and that count (int32)."""
        ...

    def cluster_stats(self) -> Any:
        """What ``log_prob`` and ``top_k`` can reuse across calls on the same parameters (None when there is
        nothing to precompute): the tree softmax's cluster bounds, TT-Rec's rebuilt table."""
        ...

    def top_k(self, h: jax.Array, n: int, stats: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Exact top-n real items: ``(log-probs [N, n] descending, ids [N, n] int32, expanded [N, n_tail] bool)``.

        ``expanded[r, j-1]``: whether tail cluster j was scored for row r (no columns for a full softmax).
        """
        ...

    def recommend(self, h: jax.Array, n: int, stats: Any = None, exclude: jax.Array | None = None,
                  max_clusters: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``top_k`` without the ids of ``exclude`` [N, E] (-1 = none), expanding at most ``max_clusters`` [N]
        tail clusters per row: ``(log-probs, ids, expanded, exact [N] bool)``, exact where no budget cut."""
        ...

    def score(self, h: jax.Array, candidates: jax.Array, stats: Any = None) -> jax.Array:
        """Exact log-probs ``[N, M]`` of candidate ids ``[N, M]`` (ids outside [1, V) score -inf)."""
        ...


class InputProjection:
    """Mixin for output layers: an optional ``h' = W h + b`` (``proj``, d x d) before the scores.

    The layer calls ``setup_projection()`` in its ``setup`` and ``project(h)`` at the top of every
    method, so the hidden state a caller passes (``NextItNet.encode``'s) is the same either way.
    """

    def setup_projection(self) -> None:
        if self.projection:
            self.proj = nn.Dense(self.dim)

    def project(self, h: jax.Array) -> jax.Array:
        return self.proj(h) if self.projection else h
