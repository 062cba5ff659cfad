"""Incremental encoding for NextItNet ("Fast WaveNet Generation", Paine et al. 2016).

``NextItNet.encode`` recomputes every position of a window on every request. At serving time only
the last position is scored, and a causal conv layer of dilation d and kernel k needs just the last
``(k - 1) * d`` inputs of that layer to produce its next output. So a user's *state* keeps, per conv
layer, a queue of those inputs; appending one event runs one position through every layer and
pushes one vector per queue: the work is O(layers), independent of the history length.

State (a pytree, batch axis first; every row is one user):

- ``"queues"``: tuple over conv layers (block 0 conv 1, block 0 conv 2, block 1 conv 1, ...) of
  ``[B, (k - 1) * d, C]`` ring buffers; the input of absolute history position ``p`` sits in slot
  ``p mod ((k - 1) * d)`` (a ring, not a shifted queue, so an append writes one slot per layer:
  with a donated state XLA updates it in place);
- ``"count"``: ``[B]`` int32, the number of events appended so far modulo the lcm of the queue
  lengths (all the ring arithmetic needs, and it never overflows);
- ``"h"``: ``[B, C]`` the last position's hidden state (what the output layer scores), kept so that a
  masked step or an empty history still has an answer.

Semantics: positions before a history's first item behave as the padding item (id 0) repeated
forever. The padding id has an embedding and the convs have biases and layer norms, so the padding
activations are not zero: ``padding_row`` computes them once per model. The incremental ``h`` equals
``NextItNet.encode([0] * P + history)[:, -1]`` for any ``P >= receptive_field(model)``; note that
``encode`` zero-pads *before its window*, so a shorter window (``P + len(history) < receptive field``)
differs from it: for such windows the zeros still reach the last position.

Serving is deterministic: no dropout anywhere.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cprec.model.conv import padded_conv_fast
from cprec.model.nextitnet import NextItNet, conv_layers

State = dict[str, Any]


def _queue_lengths(model: NextItNet) -> tuple[int, ...]:
    return tuple((model.kernel_size - 1) * d for d, _ in conv_layers(model.dilations, model.sharing))


def _count_period(model: NextItNet) -> int:
    # Every queue length divides it, so `count mod period` gives the same slots as the true count.
    return math.lcm(*(s for s in _queue_lengths(model) if s > 0)) if any(_queue_lengths(model)) else 1


def receptive_field(model: NextItNet) -> int:
    """How many positions (the current one included) the last hidden state depends on."""
    return 1 + sum(_queue_lengths(model))


def _embed_ids(module: NextItNet, ids: jax.Array) -> jax.Array:
    return module.embed(ids)


def _embed(model: NextItNet, params: Any, ids: jax.Array) -> jax.Array:
    """Input embedding (full or block-wise) through the model itself, so both kinds just work."""
    return model.apply({"params": params}, ids, method=_embed_ids)


def _window(
    model: NextItNet, params: Any, x: jax.Array, prefixes: tuple[jax.Array, ...] | None, conv: Callable = padded_conv_fast
) -> tuple[jax.Array, list[jax.Array]]:
    """``ResidualStack.window`` over [B, T, C] embeddings with a left context per conv layer (None:
    zeros); ``conv``: by default the backend's faster one, equal to encode's up to float rounding
    (tests/test_conv.py). Returns the [B, T, C] outputs and each conv layer's [B, (k-1)*d + T, C]
    prefixed inputs."""
    return model.apply({"params": params}, x, prefixes, method=lambda m, x, pre: m.stack.window(x, pre, conv))


def padding_row(model: NextItNet, params: Any) -> State:
    """The state (batch 1) of an empty history: the activations of an endless run of padding.

    A window of ``receptive_field`` padding items, zero-padded on the left like ``encode``: the
    zeros reach layer l's inputs only at the first (sum of earlier queue lengths) positions, so the
    last ``(k-1)*d`` inputs of every conv layer, and the last output, are those of endless padding.
    """
    x = _embed(model, params, jnp.zeros((1, receptive_field(model)), jnp.int32))
    h, inputs = _window(model, params, x, None)
    queues = tuple(inp[:, inp.shape[1] - s :, :] for inp, s in zip(inputs, _queue_lengths(model)))
    # Slot p mod s for position p: positions -s..-1 land in slots 0..s-1, i.e. position order.
    return {"queues": queues, "count": jnp.zeros((1,), jnp.int32), "h": h[:, -1]}


def padding_window(model: NextItNet, params: Any, length: int) -> tuple[jax.Array, ...]:
    """Per conv layer, the [1, (k-1)*d + length, C] prefixed inputs of a window of ``length`` padding
    items, zero-padded before it like ``encode``: what every left-padded window holds before its
    first item (causal, so the same for every row). See ``window_prefixes``."""
    x = _embed(model, params, jnp.zeros((1, length), jnp.int32))
    return tuple(_window(model, params, x, None)[1])


def window_prefixes(model: NextItNet, padded: tuple[jax.Array, ...], suffix: int) -> tuple[jax.Array, ...]:
    """The left context, per conv layer, of the last ``suffix`` positions of a window whose earlier
    positions are padding: ``padded`` = ``padding_window(model, params, length)`` (numpy or jax).

    Window position w sits at index w + (k-1)*d of a layer's prefixed inputs; the context of the
    suffix starting at w0 = length - suffix is window positions w0 - (k-1)*d .. w0 - 1 (zeros where
    they fall before the window, as in ``encode``).
    """
    start = padded[0].shape[1] - _queue_lengths(model)[0] - suffix
    if start < 0:
        raise ValueError(f"a suffix of {suffix} positions is longer than the padding window")
    return tuple(inp[:, start:start + s] for inp, s in zip(padded, _queue_lengths(model)))


def encode_suffix(model: NextItNet, params: Any, histories: jax.Array, prefixes: tuple[jax.Array, ...],
                  conv: Callable = padded_conv_fast) -> jax.Array:
    """``encode`` of a long left-padded window from its last positions only: ``histories`` [B, T'] are
    the window's last T' ids (every earlier one padding) and ``prefixes`` = ``window_prefixes(...,
    T')``; returns the [B, T', C] outputs of those positions, equal to ``encode``'s last T'.

    The padding positions' activations are the same for every row, so a server computes them once
    per model and encodes only as many positions as the longest history of a batch needs.
    """
    batch = histories.shape[0]
    prefixes = tuple(jnp.broadcast_to(q, (batch,) + q.shape[1:]) for q in prefixes)
    return _window(model, params, _embed(model, params, histories), prefixes, conv)[0]


def initial_state(model: NextItNet, params: Any, batch_size: int, row: State | None = None) -> State:
    """The empty-history state broadcast to ``batch_size`` rows.

    ``row``: a ``padding_row(model, params)`` computed once per model (else computed here).
    """
    row = padding_row(model, params) if row is None else row
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch_size,) + a.shape[1:]), row)


def append(
    model: NextItNet, params: Any, state: State, items: jax.Array, mask: jax.Array | None = None
) -> tuple[State, jax.Array]:
    """Appends one event per row: ``items`` [B] int -> (new state, h [B, C]).

    ``mask`` [B] bool (default all True): rows where it is False keep their state and h unchanged.
    Jit it with ``jax.jit(functools.partial(append, model))``: the model is static, params and
    state are pytrees of fixed shapes, so it compiles once per batch size.
    """
    k = model.kernel_size
    items = jnp.asarray(items, jnp.int32)
    mask = jnp.ones(items.shape, bool) if mask is None else jnp.asarray(mask, bool)
    count = state["count"]
    rows = jnp.arange(items.shape[0])
    layers = conv_layers(model.dilations, model.sharing)

    def taps(layer: int) -> list[jax.Array]:
        # Tap i reads position count - s + i*dilation, i.e. slot (count + i*dilation) mod s (the
        # stack adds the current input as the last tap).
        q, dilation = state["queues"][layer], layers[layer][0]
        return [q[rows, (count + i * dilation) % q.shape[1]] for i in range(k - 1)]
    x, inputs = model.apply({"params": params}, _embed(model, params, items), taps,
                            method=lambda m, x, t: m.stack.step(x, t))
    queues = []
    for q, y in zip(state["queues"], inputs):
        if q.shape[1]:
            slot = count % q.shape[1]  # the oldest entry (tap 0), no longer needed after this step
            q = q.at[rows, slot].set(jnp.where(mask[:, None], y, q[rows, slot]))
        queues.append(q)
    h = jnp.where(mask[:, None], x, state["h"])
    new_count = (count + mask.astype(count.dtype)) % _count_period(model)
    return {"queues": tuple(queues), "count": new_count, "h": h}, h


def append_many(
    model: NextItNet,
    params: Any,
    state: State,
    items: jax.Array,
    lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[State, jax.Array]:
    """Appends several events per row: ``items`` [B, T] -> (new state, h [B, C]).

    Give either ``lengths`` [B] (row b's events are its last ``lengths[b]`` entries: left padding)
    or ``mask`` [B, T] bool (False entries are skipped and leave the row unchanged); neither means
    every entry is an event. A scan over ``append``: T sequential steps.
    """
    items = jnp.asarray(items, jnp.int32)
    t = items.shape[1]
    if mask is None:
        if lengths is None:
            mask = jnp.ones(items.shape, bool)
        else:
            mask = jnp.arange(t)[None, :] >= t - jnp.asarray(lengths)[:, None]
    mask = jnp.asarray(mask, bool)

    def step(carry: State, xs: tuple[jax.Array, jax.Array]) -> tuple[State, None]:
        new, _ = append(model, params, carry, xs[0], xs[1])
        return new, None

    state, _ = lax.scan(step, state, (items.T, mask.T))
    return state, state["h"]


def encode_state(
    model: NextItNet, params: Any, histories: jax.Array, row: State | None = None
) -> tuple[State, jax.Array]:
    """States of whole histories: ``histories`` [B, T] left-padded with 0 -> (state, h [B, C]).

    Equal to ``initial_state`` followed by appending each row's items from its first non-zero id on
    (the leading zeros are "before the history" and skipped), but computed as one parallel pass
    over the window: each conv layer sees the padding activations (``row``'s queues) to the left
    of the window instead of ``encode``'s zeros, and its ring buffer is gathered from the last
    inputs. ``row``: a precomputed ``padding_row`` (else computed here).
    """
    row = padding_row(model, params) if row is None else row
    histories = jnp.asarray(histories, jnp.int32)
    batch, t = histories.shape
    real = histories > 0
    # Events counted from the first real item: a 0 after it is fed as item 0, like encode would.
    n = jnp.where(real.any(axis=1), t - jnp.argmax(real, axis=1), 0).astype(jnp.int32)
    prefixes = tuple(jnp.broadcast_to(q, (batch,) + q.shape[1:]) for q in row["queues"])
    out, inputs = _window(model, params, _embed(model, params, histories), prefixes)
    queues = []
    for inp, s in zip(inputs, _queue_lengths(model)):
        # Slot s' holds history position p = n - s + ((s' - n) mod s), at index T + ((s' - n) mod s)
        # of the prefixed inputs (window position w sits at index w + s; p = w - (T - n)).
        idx = t + (jnp.arange(s)[None, :] - n[:, None]) % s if s else jnp.zeros((batch, 0), jnp.int32)
        queues.append(jnp.take_along_axis(inp, idx[:, :, None], axis=1))
    h = out[:, -1]
    return {"queues": tuple(queues), "count": n % _count_period(model), "h": h}, h


def state_nbytes(state: State) -> int:
    """Bytes the state's arrays hold, for all its rows (a batch-1 state: one user's cost)."""
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(state)))
