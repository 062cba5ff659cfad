"""Sessions for SASRec: each attention block's keys and values of the positions seen so far (a KV cache).

Appending an event runs one position through every block, attending over the cached keys and
values, instead of re-encoding the window: O(blocks x positions seen) instead of
O(blocks x L^2). The functions have the signatures of ``cprec.serve.incremental`` (NextItNet's
conv state), so ``Recommender`` serves sessions of either backbone alike.

State (batch axis first; every row one user):

- ``"keys"``, ``"values"``: ``[B, num_blocks, L, dim]``, slot p holding position p of the session's
  window (positions count from its first item, as ``SASRec.encode`` does);
- ``"ids"``: ``[B, L]`` int32, the window's items in slots 0..count-1 (what a full window re-encodes from);
- ``"count"``: ``[B]`` int32, the items in the window (at most L = the model's ``max_len``);
- ``"h"``: ``[B, dim]``, the last position's hidden state.

A full window (count = L) slides: the next event drops the oldest item, and every remaining item's
position moves down by one, so the cache of that row is rebuilt from its L newest items (one
window encode, what a stateless request costs); until then an append costs one position. The state
and ``h`` always equal ``SASRec.encode`` of the session's last L items (``tests/test_sasrec.py``).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cprec.model.sasrec import SASRec
from cprec.serve.chunks import in_row_chunks
from cprec.serve.quantize import dequantize_tree

State = dict[str, Any]


def padding_row(model: SASRec, params: Any) -> State:
    """The empty session (batch 1): no items, and the hidden state of an all-padding window."""
    blocks, length = model.num_blocks, model.max_len
    h = model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), method="encode")[:, -1]
    zeros = jnp.zeros((1, blocks, length, model.dim), h.dtype)
    return {"keys": zeros, "values": zeros, "ids": jnp.zeros((1, length), jnp.int32),
            "count": jnp.zeros((1,), jnp.int32), "h": h}


def encode_state(model: SASRec, params: Any, histories: jax.Array, row: State | None = None) -> tuple[State, jax.Array]:
    """States of whole histories ``[B, T]`` (left-padded, T <= L) -> (state, h [B, dim]), one window pass."""
    histories = jnp.asarray(histories, jnp.int32)
    batch, t = histories.shape
    length = model.max_len
    n = jnp.sum(histories > 0, axis=1).astype(jnp.int32)
    h, keys, values = model.apply({"params": params}, histories, method="encode_cached")
    # Slot p holds window index t - n + p (p < n); the slots past n are never read.
    index = jnp.clip(t - n[:, None] + jnp.arange(length)[None, :], 0, t - 1)  # [B, L]
    gather = lambda kv: jnp.take_along_axis(kv, index[:, None, :, None], axis=2)
    ids = jnp.where(jnp.arange(length)[None, :] < n[:, None], jnp.take_along_axis(histories, index, axis=1), 0)
    return {"keys": gather(keys), "values": gather(values), "ids": ids, "count": n, "h": h[:, -1]}, h[:, -1]


def append(model: SASRec, params: Any, state: State, items: jax.Array, mask: jax.Array | None = None,
           encoder_rows: int | None = None) -> tuple[State, jax.Array]:
    """Appends one event per row: ``items`` [B] -> (new state, h [B, dim]); rows where ``mask`` is
    False keep their state. ``encoder_rows``: rows per pass when full windows are re-encoded
    (``cprec.serve.chunks.in_row_chunks``). ``params`` may hold int8 tables (``QuantizedTable``):
    each branch dequantizes what it reads, so XLA gathers the rows it needs instead of passing the
    whole dequantized table into the branches."""
    items = jnp.asarray(items, jnp.int32)
    mask = jnp.ones(items.shape, bool) if mask is None else jnp.asarray(mask, bool)
    length, count = model.max_len, state["count"]
    full = count >= length
    rows = jnp.arange(items.shape[0])

    def grow(_):  # one position through every block, against the cache
        slot = jnp.minimum(count, length - 1)
        h, keys, values = model.apply({"params": dequantize_tree(params)}, items, slot, state["keys"],
                                      state["values"], method="step")
        ids = state["ids"].at[rows, slot].set(items)
        return {"keys": keys, "values": values, "ids": ids, "count": jnp.minimum(count + 1, length), "h": h}

    def slide(_):  # full rows: the newest L items, re-encoded as one window
        window = jnp.concatenate([state["ids"][:, 1:], items[:, None]], axis=1)
        encode = lambda w: model.apply({"params": dequantize_tree(params)}, w, method="encode_cached")
        h, keys, values = in_row_chunks(encode, window, encoder_rows)
        # A full row's window holds L items, so slot p is window index p: no gather (encode_state's).
        return {"keys": keys, "values": values, "ids": window, "count": jnp.full_like(count, length), "h": h[:, -1]}

    def both(_):
        grown, slid = grow(None), slide(None)
        return jax.tree.map(lambda g, s: jnp.where(_rows(full, g), s, g), grown, slid)

    # Only the work some row needs: most batches are all growing (new sessions) or all sliding (long ones).
    sliding, growing = jnp.any(full & mask), jnp.any(~full & mask)
    new = lax.switch(jnp.where(sliding, jnp.where(growing, 2, 1), 0), (grow, slide, both), None)
    new = jax.tree.map(lambda n, old: jnp.where(_rows(mask, old), n, old), new, state)
    return new, new["h"]


def _rows(flags: jax.Array, like: jax.Array) -> jax.Array:
    return flags.reshape(flags.shape + (1,) * (like.ndim - 1))


def append_many(model: SASRec, params: Any, state: State, items: jax.Array, lengths: jax.Array | None = None,
                mask: jax.Array | None = None, encoder_rows: int | None = None) -> tuple[State, jax.Array]:
    """Appends several events per row, ``items`` [B, T] (``lengths`` or ``mask`` as
    ``cprec.serve.incremental.append_many``): a scan over ``append``."""
    items = jnp.asarray(items, jnp.int32)
    t = items.shape[1]
    if mask is None:
        mask = jnp.ones(items.shape, bool) if lengths is None else \
            jnp.arange(t)[None, :] >= t - jnp.asarray(lengths)[:, None]
    mask = jnp.asarray(mask, bool)
    step = lambda carry, x, m: append(model, params, carry, x, m, encoder_rows)[0]
    if t == 1:  # a session's usual event: no loop (a scan would copy the cache in and out)
        state = step(state, items[:, 0], mask[:, 0])
    else:
        state, _ = lax.scan(lambda carry, xs: (step(carry, *xs), None), state, (items.T, mask.T))
    return state, state["h"]
