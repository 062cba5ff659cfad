"""The full item table trained with a sampled softmax and a log-Q correction.

Training scores each target against S negatives shared by every token of the step (and, optionally,
against the batch's other targets), not against all V items: Jean et al., "On Using Very Large
Target Vocabulary", ACL 2015; Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus
Item Recommendations", RecSys 2019. Every candidate's logit is corrected by subtracting the log of
its expected count among the candidates (log S Q(i) for S draws from a sampler Q), which makes the
loss an estimate of the full softmax's; a negative equal to the token's own target (an accidental
hit) is masked out. Candidates are scored through the table's own rows (``rows``): the step costs
a gather of S + N rows and an [N, S] product, whatever V is.

The parameters are exactly those of ``FullSoftmax`` (its own ``[dim, V]`` kernel, or tied to the
input embedding, with or without the output projection), and so is everything but the training
loss: evaluation, ``top_k``, export and serving score every item.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cprec.model.full_softmax import FullSoftmax

# Negative samplers of training (cprec/train/sampling.py): every real item alike, or by training count ** alpha.
SAMPLERS = ("uniform", "unigram")


class Negatives(NamedTuple):
    """The candidates of one loss call besides each token's own target, with their log-Q corrections."""

    ids: jax.Array  # [S] int32 sampled item ids, shared by every token
    log_count: jax.Array  # [S] log of each sampled id's expected count among the S draws, log(S Q(id))
    target_log_count: jax.Array  # [N] the same correction for each token's own target
    # [N] log of each token's target's share of the training targets (its unigram probability), when
    # the batch's other targets are negatives too (their expected count is that times the token count);
    # None: no in-batch negatives.
    target_log_share: jax.Array | None = None


class SampledSoftmax(FullSoftmax):
    """``FullSoftmax`` whose ``loss`` takes ``Negatives``: the sampled softmax with log-Q correction."""

    def rows(self, ids: jax.Array) -> jax.Array:
        """``[..., dim]`` output vectors of item ids: the table's own lookup (no ``[N, V]`` product)."""
        if self.tied_to is not None:
            return self.tied_to(ids)
        return jnp.moveaxis(jnp.take(self.kernel, ids, axis=1), 0, -1)

    def loss(self, h: jax.Array, targets: jax.Array, mask: jax.Array,
             negatives: Negatives | None = None) -> tuple[jax.Array, jax.Array]:
        """Mean corrected sampled-softmax NLL over the tokens where ``mask`` is true, and their count.

        Without ``negatives``: the full softmax's loss (``FullSoftmax.loss``).
        """
        if negatives is None:
            return super().loss(h, targets, mask)
        hp = self.project(h)
        target_rows = self.rows(targets)
        positive = jnp.sum(hp * target_rows, axis=-1) - negatives.target_log_count
        sampled = hp @ self.rows(negatives.ids).T - negatives.log_count[None, :]
        parts = [jnp.where(negatives.ids[None, :] == targets[:, None], -jnp.inf, sampled)]
        count = jnp.sum(mask.astype(jnp.int32))
        if negatives.target_log_share is not None:
            # Each real target of the call is a candidate; its expected count among them is its
            # share of the training targets times their number.
            in_batch = hp @ target_rows.T - (negatives.target_log_share + jnp.log(jnp.maximum(count, 1)))[None, :]
            hit = (targets[None, :] == targets[:, None]) | ~mask[None, :]  # the token's own item, and padding
            parts.append(jnp.where(hit, -jnp.inf, in_batch))
        nll = _logsumexp_with(positive, parts) - positive
        return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(count, 1).astype(nll.dtype), count


def _logsumexp_with(first: jax.Array, parts: list[jax.Array]) -> jax.Array:
    """``[N]`` logsumexp over ``first`` ``[N]`` and every ``[N, K]`` part's row, without concatenating
    them: a ``[N, 1 + K]`` copy of the logits (and of its gradient) costs more than the sum itself.
    ``first`` is finite, so the sum is never zero, even where a part's row is all masked (-inf)."""
    top = first
    for part in parts:
        top = jnp.maximum(top, jnp.max(part, axis=1))
    top = jax.lax.stop_gradient(top)
    total = jnp.exp(first - top)
    for part in parts:
        total = total + jnp.sum(jnp.exp(part - top[:, None]), axis=1)
    return jnp.log(total) + top
