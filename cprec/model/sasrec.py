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
    """Multi-head causal self-attention, then a point-wise feed-forward layer (post-LN, as RecBole)."""

    dim: int
    num_heads: int
    inner_dim: int
    dropout: float
    attn_dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
        b, t, d = x.shape
        heads, width = self.num_heads, d // self.num_heads
        dense = lambda n, name: nn.Dense(n, kernel_init=INIT, name=name)
        split = lambda y: y.reshape(b, t, heads, width)
        q, k, v = (split(dense(d, name)(x)) for name in ("query", "key", "value"))
        scores = jnp.einsum("bqhw,bkhw->bhqk", q, k) / math.sqrt(width)
        probs = jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1)
        probs = nn.Dropout(self.attn_dropout)(probs, deterministic=not train)
        context = jnp.einsum("bhqk,bkhw->bqhw", probs, v).reshape(b, t, d)
        out = nn.Dropout(self.dropout)(dense(d, "attn_out")(context), deterministic=not train)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, name="ln_attn")(out + x)
        f = dense(d, "ffn_out")(jax.nn.gelu(dense(self.inner_dim, "ffn_in")(x), approximate=False))
        f = nn.Dropout(self.dropout)(f, deterministic=not train)
        return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, name="ln_ffn")(f + x)


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

    def encode(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        """[B, T] item ids (T <= max_len, left-padded) -> [B, T, dim]; position t sees items <= t only."""
        t = inputs.shape[1]
        if t > self.max_len:
            raise ConfigError(f"SASRec got windows of {t} items but has {self.max_len} positions (data.max_len)")
        padding = t - jnp.sum(inputs > 0, axis=1, keepdims=True)  # left padding: the real items come last
        positions = jnp.clip(jnp.arange(t)[None, :] - padding, 0, self.max_len - 1)  # padding rows: masked anyway
        x = self.embed(inputs) + jnp.take(self.position, positions, axis=0)
        x = self.drop(self.ln_input(x), deterministic=not train) if self.dropout > 0 else self.ln_input(x)
        mask = attention_mask(inputs)
        for u in self.block_index:
            x = self.blocks[u](x, mask, train)
        return x
