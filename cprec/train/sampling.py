"""The negatives of the sampled softmax (``model.softmax = 'sampled'``) and their log-Q corrections.

``uniform`` draws every real item alike; ``unigram`` draws item i with probability proportional to
its training count raised to ``model.sampler_alpha`` (0.75, word2vec's choice: popular items are the
informative negatives, the tail is not starved). ``model.sampler_smoothing`` k adds k to every count
first: items that never occur in training are then drawn too (by default, k = 0, they never are, and
nothing pushes their scores down; a table that builds their rows from shared trained parameters,
such as TT-Rec's, can then rank them first). Drawing is inverse-CDF sampling on an integer table
(one ``searchsorted`` per draw, whatever V is), and the probabilities of the correction are exactly
those of that table. Draws depend only on the key, which the train step folds from (seed, step):
a resumed run draws the same negatives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cprec.model.sampled_softmax import SAMPLERS, Negatives

# The integer CDF's total: int32 draws in [0, TOTAL) resolve probabilities down to 5e-10.
_TOTAL = 2**31 - 1


class Sampler:
    """Shared negatives for a step, and the log expected count of any candidate among them.

    ``item_counts`` [V]: training counts by frequency-ordered id (id 0 = padding, never drawn).
    """

    def __init__(self, item_counts: np.ndarray, num_negatives: int, kind: str = "unigram", alpha: float = 0.75,
                 in_batch: bool = False, smoothing: float = 0.0) -> None:
        if kind not in SAMPLERS:
            raise ValueError(f"sampler {kind!r} is unknown; valid choices: {', '.join(SAMPLERS)}")
        counts = np.asarray(item_counts, np.float64)
        weights = np.zeros_like(counts)
        # unigram without smoothing: never-trained items are never drawn
        weights[1:] = 1.0 if kind == "uniform" else (counts[1:] + smoothing) ** alpha
        edges = np.round(np.cumsum(weights) / weights.sum() * _TOTAL).astype(np.int64)
        q = np.diff(edges, prepend=0) / _TOTAL  # the table's exact probabilities
        self.num_negatives, self.kind, self.in_batch = int(num_negatives), kind, bool(in_batch)
        self._edges = jnp.asarray(edges, jnp.int32)
        # Floors keep the correction finite for ids the table cannot draw (padding targets, masked anyway).
        self._log_q = jnp.asarray(np.log(np.maximum(q, 1.0 / _TOTAL)), jnp.float32)
        share = counts / max(counts[1:].sum(), 1.0)
        self._log_share = jnp.asarray(np.log(np.maximum(share, 1.0 / _TOTAL)), jnp.float32)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, item_counts: np.ndarray) -> Sampler | None:
        """The sampler ``config.model`` asks for; None unless the softmax is sampled."""
        m = config.model
        if m.softmax != "sampled":
            return None
        return cls(item_counts, m.num_negatives, m.sampler, m.sampler_alpha, m.in_batch_negatives, m.sampler_smoothing)

    def probabilities(self) -> np.ndarray:
        """Q [V]: the probability of each id per draw (0 for padding)."""
        return np.diff(np.asarray(self._edges, np.int64), prepend=0) / _TOTAL

    def draw(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``num_negatives`` ids drawn with replacement, and log S Q(id) of each."""
        u = jax.random.randint(key, (self.num_negatives,), 0, _TOTAL, jnp.int32)
        ids = jnp.searchsorted(self._edges, u, side="right").astype(jnp.int32)
        return ids, self.log_count(ids)

    def log_count(self, ids: jax.Array) -> jax.Array:
        """log S Q(id): the log expected count of each id among the step's S draws."""
        return jnp.log(float(self.num_negatives)) + self._log_q[ids]

    def restricted(self, rows: jax.Array) -> Sampler:
        """This sampler's corrections for ids remapped into ``rows`` (id k stands for ``rows[k]``), as a
        row-sparse step sees them (``cprec.train.sparse_tables``); it does not draw."""
        view = object.__new__(Sampler)
        view.num_negatives, view.kind, view.in_batch, view._edges = self.num_negatives, self.kind, self.in_batch, None
        view._log_q = jnp.take(self._log_q, rows, mode="clip")
        view._log_share = jnp.take(self._log_share, rows, mode="clip")
        return view

    def negatives(self, drawn: tuple[jax.Array, jax.Array], targets: jax.Array) -> Negatives:
        """The ``Negatives`` of a loss call whose tokens have ``targets`` (flattened)."""
        ids, log_count = drawn
        targets = targets.reshape(-1)
        share = self._log_share[targets] if self.in_batch else None
        return Negatives(ids, log_count, self.log_count(targets), share)
