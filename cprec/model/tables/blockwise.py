"""Block-wise adaptive item table (CpRec's input embedding; with Ginart et al.'s rule, mixed-dimension embeddings).

Parameters, for clusters given by ``cutoffs`` (see ``cprec.model.clusters``) and ranks ``d_j``:

- ``head``: ``[k1, dim]`` plain lookup table for ids ``[0, k1)`` (padding id 0 included);
- ``tail_{j}_emb``: ``[k_j, d_j]`` and ``tail_{j}_proj``: ``[d_j, dim]`` for tail cluster
  j = 1..n-1 holding ids ``[cutoffs[j-1], cutoffs[j])``; its embedding is ``emb[id - offset] @ proj``.

Parameter count: ``sum_j k_j * d_j + sum_{tail j} d_j * dim``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.model.clusters import check_clusters
from cprec.model.tables.base import ItemTable

Initializer = Callable[..., jax.Array]

# nn.Embed's default: std 1/sqrt(fan) over the last (feature) axis.
default_embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
# With emb std 1/sqrt(d_j) and proj std 1/sqrt(dim), a tail row has the head's scale 1/sqrt(dim).
default_proj_init = nn.initializers.variance_scaling(1.0, "fan_out", "normal")


def blockwise_param_count(cutoffs: tuple[int, ...], ranks: tuple[int, ...], dim: int) -> int:
    """``sum_j k_j * d_j + sum_{tail j} d_j * dim`` for the given clusters."""
    bounds = (0,) + tuple(cutoffs)
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    return sum(k * d for k, d in zip(sizes, ranks)) + sum(d * dim for d in ranks[1:])


def blockwise_table_param_count(num_items: int, dim: int, options: dict) -> int:
    """``blockwise_param_count`` in the signature of the other tables' counts."""
    return blockwise_param_count(tuple(options["cutoffs"]), tuple(options["ranks"]), dim)


class BlockwiseEmbedding(ItemTable):
    """Embeds frequency-ordered item ids; ``cutoffs == (V,)`` is an ordinary embedding.

    Every token goes through every cluster's (masked) lookup and projection so shapes stay static
    under jit; the cost per token is ``sum_j d_j * dim``, small next to the network.
    """

    cutoffs: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()
    embedding_init: Initializer = default_embed_init
    proj_init: Initializer = default_proj_init
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        check_clusters(self.num_items, self.dim, self.cutoffs, self.ranks)
        bounds = (0,) + tuple(self.cutoffs)
        self.head = self.param("head", self.embedding_init, (bounds[1], self.dim), self.param_dtype)
        tail_emb, tail_proj = [], []
        for j in range(1, len(self.cutoffs)):
            k, d = bounds[j + 1] - bounds[j], self.ranks[j]
            tail_emb.append(self.param(f"tail_{j}_emb", self.embedding_init, (k, d), self.param_dtype))
            tail_proj.append(self.param(f"tail_{j}_proj", self.proj_init, (d, self.dim), self.param_dtype))
        self.tail_emb, self.tail_proj = tail_emb, tail_proj

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids`` int[...] -> float[..., dim]."""
        ids = jnp.asarray(ids)
        bounds = (0,) + tuple(self.cutoffs)
        k1 = bounds[1]
        # Clip then mask: a static gather per cluster instead of data-dependent routing.
        out = jnp.take(self.head, jnp.clip(ids, 0, k1 - 1), axis=0)
        out = jnp.where((ids < k1)[..., None], out, 0)
        for j, (emb, proj) in enumerate(zip(self.tail_emb, self.tail_proj), start=1):
            local = ids - bounds[j]
            inside = (local >= 0) & (local < emb.shape[0])
            e = jnp.take(emb, jnp.clip(local, 0, emb.shape[0] - 1), axis=0)
            out = out + jnp.where(inside[..., None], e, 0) @ proj
        return out

    def dense(self) -> jax.Array:
        return jnp.concatenate([self.head] + [e @ p for e, p in zip(self.tail_emb, self.tail_proj)], axis=0)

    def logits(self, h: jax.Array) -> jax.Array:
        # Each cluster through its own rank: (h P_j^T) E_j^T, d_j multiply-adds per tail item.
        return jnp.concatenate([h @ self.head.T] + [(h @ p.T) @ e.T for e, p in zip(self.tail_emb, self.tail_proj)],
                               axis=1)
