"""SASRec (Kang and McAuley, ICDM 2018) as the encoder of ``SequentialRecommender``, as RecBole implements it.

item ids -> item table + learned positional embedding -> LayerNorm -> dropout -> blocks of causal
multi-head self-attention and a point-wise feed-forward layer (GELU), each with dropout, a
residual connection and a LayerNorm after it -> hidden states. A position attends to itself and
earlier positions that hold an item (padding is masked from attention as a key, and from the loss).
Positions count the window's items from its first real one (0, 1, ...; RecBole's order), so a
history reads the same whatever padding precedes it (windows are left-padded), and appending an
item never moves the positions of the items before it (what a session's KV cache needs).

Sharing (CpRec's schemes mapped onto attention blocks; ALBERT shares whole blocks): ``none``,
``cross_block`` (every block uses one set of weights, layer norms included) and ``adjacent_block``
(blocks (0, 1), (2, 3), ... share). ``cross_layer`` and ``adjacent_layer`` share the two conv
layers of a NextItNet block; a SASRec block's attention and feed-forward layers have different
shapes, so they have no analogue here and are refused.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.errors import ConfigError
from cprec.model.sequential import SequentialRecommender

SASREC_SHARING = ("none", "cross_block", "adjacent_block")
LAYER_NORM_EPSILON = 1e-12  # RecBole's
MASKED = -10000.0  # RecBole's additive mask: a fully masked row (a padding query) stays finite
INIT = nn.initializers.normal(stddev=0.02)  # RecBole's initializer_range


def block_sharing_index(scheme: str, num_blocks: int) -> tuple[int, tuple[int, ...]]:
    """(number of unique attention blocks, block -> unique block index) of a sharing scheme."""
    if scheme not in SASREC_SHARING:
        raise ConfigError(f"model.sharing={scheme!r} has no analogue in SASRec (its blocks' attention and "
                          f"feed-forward layers differ in shape); valid for model.backbone=sasrec: "
                          f"{', '.join(SASREC_SHARING)}")
    if scheme == "adjacent_block" and num_blocks % 2:
        raise ConfigError(f"model.sharing='adjacent_block' needs an even number of blocks, got model.num_blocks="
                          f"{num_blocks}")
    index = {"none": list(range(num_blocks)), "cross_block": [0] * num_blocks,
             "adjacent_block": [b // 2 for b in range(num_blocks)]}[scheme]
    return max(index) + 1, tuple(index)


def attention_mask(inputs: jax.Array) -> jax.Array:
    """[B, T] ids -> [B, 1, T, T] bool: query q may attend key k (k <= q, and k holds an item)."""
    t = inputs.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return (causal[None] & (inputs > 0)[:, None, :])[:, None]


class AttentionBlock(nn.Module):
    """Multi-head causal self-attention, then a point-wise feed-forward layer (post-LN, as RecBole).

    ``__call__`` runs a window; ``key_value`` and ``attend`` are its two halves, which a session's
    KV cache (``cprec.serve.kv_cache``) calls for one new position against the cached keys.
    """

    dim: int
    num_heads: int
    inner_dim: int
    dropout: float
    attn_dropout: float

    def setup(self) -> None:
        dense = lambda n: nn.Dense(n, kernel_init=INIT)
        self.query, self.key, self.value, self.attn_out = dense(self.dim), dense(self.dim), dense(self.dim), dense(self.dim)
        self.ffn_in, self.ffn_out = dense(self.inner_dim), dense(self.dim)
        self.ln_attn = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON)
        self.ln_ffn = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON)
        self.drop = nn.Dropout(self.dropout)
        self.attn_drop = nn.Dropout(self.attn_dropout)

    def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The keys and values ``[..., dim]`` of positions ``x`` ``[..., dim]``."""
        return self.key(x), self.value(x)

    def attend(self, x: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
               train: bool = False) -> jax.Array:
        """Queries ``x`` [B, Q, dim] over ``keys``/``values`` [B, K, dim] where ``mask`` [B, 1, Q, K] allows,
        then the feed-forward layer: [B, Q, dim]."""
        heads, width = self.num_heads, self.dim // self.num_heads
        split = lambda y: y.reshape(*y.shape[:2], heads, width)
        scores = jnp.einsum("bqhw,bkhw->bhqk", split(self.query(x)), split(keys)) / math.sqrt(width)
        probs = self.attn_drop(jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1), deterministic=not train)
        context = jnp.einsum("bhqk,bkhw->bqhw", probs, split(values)).reshape(x.shape)
        x = self.ln_attn(self.drop(self.attn_out(context), deterministic=not train) + x)
        f = self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False))
        return self.ln_ffn(self.drop(f, deterministic=not train) + x)

    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
        return self.attend(x, *self.key_value(x), mask, train)


class SASRec(SequentialRecommender):
    """SASRec: ``dropout`` is RecBole's hidden dropout (embedding, attention output, feed-forward)."""

    max_len: int = 50  # positions (the training window L)
    num_blocks: int = 2
    num_heads: int = 2
    inner_dim: int = 256
    attn_dropout: float = 0.0

    def setup(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(f"model.dim={self.dim} must be a multiple of model.num_heads={self.num_heads}")
        self.setup_items()
        self.position = self.param("position", INIT, (self.max_len, self.dim))
        self.ln_input = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON)
        n_unique, self.block_index = block_sharing_index(self.sharing, self.num_blocks)
        self.blocks = [AttentionBlock(self.dim, self.num_heads, self.inner_dim, self.dropout, self.attn_dropout)
                       for _ in range(n_unique)]

    def _inputs(self, ids: jax.Array, positions: jax.Array, train: bool = False) -> jax.Array:
        x = self.ln_input(self.embed(ids) + jnp.take(self.position, positions, axis=0))
        return self.drop(x, deterministic=not train) if self.dropout > 0 else x

    def encode(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        """[B, T] item ids (T <= max_len, left-padded) -> [B, T, dim]; position t sees items <= t only."""
        return self.encode_cached(inputs, train)[0]

    def encode_cached(self, inputs: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``encode``, and every block's keys and values ``[B, num_blocks, T, dim]`` (a session's cache)."""
        t = inputs.shape[1]
        if t > self.max_len:
            raise ConfigError(f"SASRec got windows of {t} items but has {self.max_len} positions (data.max_len)")
        padding = t - jnp.sum(inputs > 0, axis=1, keepdims=True)  # left padding: the real items come last
        positions = jnp.clip(jnp.arange(t)[None, :] - padding, 0, self.max_len - 1)  # padding rows: masked anyway
        x = self._inputs(inputs, positions, train)
        mask = attention_mask(inputs)
        keys, values = [], []
        for u in self.block_index:
            k, v = self.blocks[u].key_value(x)
            keys.append(k)
            values.append(v)
            x = self.blocks[u].attend(x, k, v, mask, train)
        return x, jnp.stack(keys, axis=1), jnp.stack(values, axis=1)

    def step(self, items: jax.Array, count: jax.Array, keys: jax.Array,
             values: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One new item per row at position ``count`` [B] (< max_len), against cached ``keys``/``values``
        [B, num_blocks, max_len, dim] whose slots < count hold the earlier items: (h [B, dim], keys, values)
        with the new item's written into slot ``count``."""
        rows = jnp.arange(items.shape[0])
        x = self._inputs(items, count)[:, None]  # [B, 1, dim]
        valid = (jnp.arange(keys.shape[2])[None, :] <= count[:, None])[:, None, None, :]  # [B, 1, 1, L]
        for b, u in enumerate(self.block_index):
            k, v = self.blocks[u].key_value(x[:, 0])
            keys = keys.at[rows, b, count].set(k)
            values = values.at[rows, b, count].set(v)
            x = self.blocks[u].attend(x, keys[:, b], values[:, b], valid)
        return x[:, 0], keys, values
