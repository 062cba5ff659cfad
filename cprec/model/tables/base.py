"""What every item table answers: vectors of ids, scores of every item, and its size.

An item table maps the V frequency-ordered item ids (id 0 = padding) to ``dim``-vectors. The
model uses one as its input embedding and, tied, as its output layer (``logits = h' E^T``) under
the full or the sampled softmax; so every representation (``cprec.model.tables``) implements:

- ``__call__(ids)``: ``[..., dim]`` vectors of ids (the input lookup, and the candidates of a
  sampled softmax);
- ``logits(h)``: ``[N, V]`` scores ``h E^T`` of every item for hidden states ``h`` ``[N, dim]``,
  computed from the table's own factors, never from a reconstructed ``[V, dim]`` table (the
  default scores cache-sized blocks of ids through ``__call__``; a table with a cheaper
  factorisation overrides it);
- ``dense()``: the reconstructed ``[V, dim]`` table (the full softmax's training loss, and tests);
- ``scoring_table()``: what scoring reuses across calls on the same parameters, where rebuilding
  rows on every call costs more than keeping them (TT-Rec: its ``dense()``); None for the rest;
- ``param_count(num_items, dim, options)``: its parameter count, a closed form the budget
  solvers use (``tests/test_tables.py`` holds it equal to the built module's).

Stored bytes are the parameters' (float32: 4 per parameter; an int8 export quantises the tables
with one slice per item, ``cprec.model.param_groups.ITEM_TABLES``).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Ids scored per block by the default ``logits``: a [block, dim] float32 slab of rows (1 MiB at
# dim 64) stays in cache while every hidden state is scored against it.
SCORE_BLOCK = 4096


class ItemTable(nn.Module):
    """Base of the item tables: ``num_items`` (V, padding included) vectors of size ``dim``."""

    num_items: int
    dim: int

    def dense(self) -> jax.Array:
        """The reconstructed ``[V, dim]`` table."""
        return self(jnp.arange(self.num_items, dtype=jnp.int32))

    def scoring_table(self) -> jax.Array | None:
        """A ``[V, dim]`` table for evaluation and serving to compute once and score every call against
        (``h E^T``), or None where ``logits`` from the factors costs no more per call."""
        return None

    def logits(self, h: jax.Array) -> jax.Array:
        """``[N, dim]`` -> ``[N, V]`` ``h E^T``, one block of ``SCORE_BLOCK`` ids at a time."""
        block = min(SCORE_BLOCK, self.num_items)
        num_blocks = -(-self.num_items // block)
        ids = jnp.arange(num_blocks * block, dtype=jnp.int32).reshape(num_blocks, block)
        # Ids past V (the last block's padding) are clipped to a real row and sliced off below.
        rows = lambda b: h @ self(jnp.minimum(b, self.num_items - 1)).T
        scores = jax.lax.map(rows, ids)  # [blocks, N, block]
        return jnp.moveaxis(scores, 0, 1).reshape(h.shape[0], -1)[:, : self.num_items]
