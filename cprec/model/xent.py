"""Softmax cross-entropy of rows of x @ w against one column each, without [rows, columns] gradients.

Shared by the full softmax and each cluster of the tree softmax. `softmax_xent` picks the plain
fused kernel or, for big low-rank clusters, the column-blocked one with an online logsumexp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# ----------------------------------------------------------------------------------------------
# Numerics shared by every path: log_prob, loss and top_k use the same formulas so that top_k's
# early-stop test (item log-prob <= token log-prob) holds on the computed values, not only in math.

def lse(logits: jax.Array) -> jax.Array:
    """logsumexp over the last axis; lse >= max exactly, so log-softmax values are <= 0."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    return (m + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)))[..., 0]


def log_softmax(logits: jax.Array) -> jax.Array:
    return logits - lse(logits)[..., None]


# ----------------------------------------------------------------------------------------------
# Cross-entropy of rows of x @ w against one column each, with a hand-written backward.
# The forward keeps e = exp(logits - max) (needed for the sum anyway) so the backward spends no
# exp, and the softmax normalisation and the one-hot are folded into the two backward matmuls:
#   d logits = (g/s) e - g onehot  =>  dx = (g/s) (e @ w.T) - g w[:, cols].T,
#                                      dw = (x g/s).T @ e - scatter(cols, x g).
# So [R, K] is written twice (logits, e) and read four times, and no [R, K] cotangent is built.

@jax.custom_vjp
def row_xent(x: jax.Array, w: jax.Array, cols: jax.Array) -> jax.Array:
    """Per-row ``logsumexp(x @ w) - (x @ w)[row, cols[row]]``."""
    logits = x @ w
    return lse(logits) - jnp.take_along_axis(logits, cols[:, None], axis=1)[:, 0]


def _xent_fwd(x, w, cols):
    logits = x @ w
    tgt = jnp.take_along_axis(logits, cols[:, None], axis=1)[:, 0]
    m = lax.stop_gradient(jnp.max(logits, axis=1))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m[:, None])
    s = jnp.sum(e, axis=1)
    return m + jnp.log(s) - tgt, (x, w, cols, e, s)


def _xent_bwd(res, g):
    x, w, cols, e, s = res
    a = g / s
    w_t = jnp.take(w, cols, axis=1).T  # [R, d]
    dx = (e @ w.T) * a[:, None] - w_t * g[:, None]
    dw = (x * a[:, None]).T @ e
    dw = dw.at[:, cols].add(-(x * g[:, None]).T)
    return dx, dw, None


row_xent.defvjp(_xent_fwd, _xent_bwd)


# ----------------------------------------------------------------------------------------------
# Big low-rank clusters in column blocks. An [R, K] array of a million-item cluster does not stay
# in cache, and on CPU its elementwise passes (exp, max, sum) then run several times slower than
# on a cache-sized block, plus the page faults of a fresh buffer each step. So for such clusters
# the logits are produced block by block inside a loop (one reused buffer) with an online
# logsumexp; the backward recomputes each block (cheap at rank <= 16) instead of storing [R, K].
# Module constants, not arguments, so that tests can shrink them to exercise the blocked paths.

_BLOCK_MAX_RANK = 16          # higher ranks make the recompute matmul cost more than it saves
_BLOCK_MIN_ELEMENTS = 1 << 22  # rows * columns from which a cluster is blocked
_BLOCK_ELEMENTS = 1 << 21      # target rows * block columns (8 MiB of f32)
_BLOCK_RANGE = (1024, 32768)   # block width bounds (columns)


def use_blocks(rows: int, rank: int, cols: int) -> bool:
    return rank <= _BLOCK_MAX_RANK and rows * cols >= _BLOCK_MIN_ELEMENTS


def block_width(rows: int, cols: int) -> int:
    lo, hi = _BLOCK_RANGE
    width = 1 << max(0, (_BLOCK_ELEMENTS // max(rows, 1)).bit_length() - 1)
    return int(min(max(width, lo), hi, max(cols, 1)))


def column_blocks(w: jax.Array, width: int) -> jax.Array:
    """``w`` [r, K] -> [ceil(K / width), r, width], zero-padded (padded columns get masked)."""
    r, k = w.shape
    nb = -(-k // width)
    return jnp.pad(w, ((0, 0), (0, nb * width - k))).reshape(r, nb, width).transpose(1, 0, 2)


def block_logits(x, w_blk, b, width, k):
    logits = x @ w_blk
    col = b * width + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return jnp.where(col < k, logits, -jnp.inf)


def online_lse(m, s, logits):
    """One step of a running logsumexp; keeps s >= 1 once finite so lse >= every logit seen."""
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
    return m_new, s


def _xent_blocked_fwd(x, w, cols):
    rows, k = x.shape[0], w.shape[1]
    width = block_width(rows, k)
    blocks = column_blocks(w, width)

    def body(carry, inp):
        b, w_blk = inp
        return online_lse(*carry, block_logits(x, w_blk, b, width, k)), None

    init = (jnp.full((rows,), -jnp.inf, x.dtype), jnp.zeros((rows,), x.dtype))
    (m, s), _ = lax.scan(body, init, (jnp.arange(blocks.shape[0]), blocks))
    lse = m + jnp.log(s)
    tgt = jnp.sum(x * jnp.take(w, cols, axis=1).T, axis=1)
    return lse - tgt, (x, w, cols, lse)


def _xent_blocked_bwd(res, g):
    x, w, cols, lse = res
    k = w.shape[1]
    width = block_width(x.shape[0], k)
    blocks = column_blocks(w, width)

    def body(dx, inp):
        b, w_blk = inp
        p = jnp.exp(block_logits(x, w_blk, b, width, k) - lse[:, None]) * g[:, None]
        return dx + p @ w_blk.T, x.T @ p

    dx, dw = lax.scan(body, jnp.zeros_like(x), (jnp.arange(blocks.shape[0]), blocks))
    dw = dw.transpose(1, 0, 2).reshape(w.shape[0], -1)[:, :k]
    dx = dx - jnp.take(w, cols, axis=1).T * g[:, None]
    dw = dw.at[:, cols].add(-(x * g[:, None]).T)
    return dx, dw, None


_xent_blocked = jax.custom_vjp(lambda x, w, cols: _xent_blocked_fwd(x, w, cols)[0])
_xent_blocked.defvjp(_xent_blocked_fwd, _xent_blocked_bwd)


def softmax_xent(x: jax.Array, w: jax.Array, cols: jax.Array) -> jax.Array:
    """Per-row NLL of ``x @ w`` at ``cols``, blocked when the cluster is big and low-rank."""
    if use_blocks(x.shape[0], x.shape[1], w.shape[1]):
        return _xent_blocked(x, w, cols)
    return row_xent(x, w, cols)
