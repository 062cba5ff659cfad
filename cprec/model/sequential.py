"""What every backbone shares: the item table in, the output layer out, and the training loss.

A sequential recommender here is item ids ``[B, T]`` -> input item table (``cprec.model.tables``)
-> an encoder (the backbone: ``NextItNet``'s dilated convs, ``SASRec``'s causal self-attention)
-> hidden states ``[B, T, d]`` -> an output layer (full, sampled or tree softmax, possibly tied to
the input table). A backbone subclasses ``SequentialRecommender``, calls ``setup_items()`` in its
``setup`` and implements ``encode``; training, evaluation and top-N are the same for all.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from cprec.errors import ConfigError
from cprec.model.full_softmax import FullSoftmax
from cprec.model.sampled_softmax import Negatives, SampledSoftmax
from cprec.model.tables import make_table
from cprec.model.tree_softmax import BlockwiseSoftmax


class SequentialRecommender(nn.Module):
    """Item table, dropout on it, encoder (``encode``, the subclass's) and output layer."""

    num_items: int  # V, including padding id 0
    dim: int
    sharing: str = "none"  # the backbone's own layer-sharing scheme (cprec.model.sharing)
    embedding: str = "full"  # an item table of cprec.model.tables.TABLES: 'full' | 'blockwise' | 'mde' | 'lowrank' | ...
    softmax: str = "full"  # 'full' | 'sampled' (the full table, trained on sampled negatives) | 'tree'
    cutoffs: tuple[int, ...] = ()  # cluster boundaries ending with V (block-wise parts)
    ranks: tuple[int, ...] = ()  # per-cluster ranks, ranks[0] == dim
    capacities: tuple[int, ...] | None = None  # static tail-cluster token capacities (tree softmax)
    dropout: float = 0.0  # on the input embedding, training only
    # The output layer shares the input embedding's item tables (full or sampled softmax: logits =
    # h' E^T for any table; CpRec's tree softmax: each cluster's table, block-wise embedding only).
    tie_embeddings: bool = False
    tie_projections: bool = False  # tied CpRec: the tail projections too (no effect without tied CpRec)
    output_projection: bool = False  # h' = W h + b (d x d) before the output layer
    # The sized tables' options as (key, value) pairs, e.g. (("rank", 8),) for 'lowrank'.
    table_options: tuple[tuple[str, Any], ...] = ()

    def setup_items(self) -> None:
        """The item table (``embed``), its dropout and the output layer (``head``)."""
        check_tying(self.embedding, self.softmax, self.tie_embeddings)
        self.embed = make_table(self.embedding, self.num_items, self.dim, self.cutoffs, self.ranks, self.table_options)
        self.drop = nn.Dropout(self.dropout)
        tied = self.embed if self.tie_embeddings else None
        if self.softmax == "tree":
            self.head = BlockwiseSoftmax(self.dim, self.num_items, self.cutoffs, self.ranks, self.capacities,
                                         tied_to=tied, tie_projections=self.tie_projections and tied is not None,
                                         projection=self.output_projection)
        else:
            head = SampledSoftmax if self.softmax == "sampled" else FullSoftmax
            self.head = head(self.dim, self.num_items, tied_to=tied, projection=self.output_projection)

    def embed_items(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        """[B, T] item ids -> [B, T, dim] input vectors (dropout while training)."""
        x = self.embed(inputs)
        return self.drop(x, deterministic=not train) if self.dropout > 0 else x

    def encode(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        """[B, T] item ids -> [B, T, dim] hidden states; position t sees positions <= t only."""
        raise NotImplementedError

    def loss(self, inputs: jax.Array, targets: jax.Array, train: bool = False,
             negatives: Negatives | None = None) -> tuple[jax.Array, jax.Array]:
        """Mean NLL of every non-padding target of the window, and the target count.

        ``negatives``: the sampled softmax's candidates (per-token fields in the order of
        ``targets.reshape(-1)``); without them every output layer computes its exact loss.
        """
        h = self.encode(inputs, train)
        mask = target_mask(inputs, targets)
        extra = () if negatives is None else (negatives,)
        return self.head.loss(h.reshape(-1, self.dim), targets.reshape(-1), mask.reshape(-1), *extra)

    def last_log_prob(self, inputs: jax.Array, stats=None) -> jax.Array:
        """[B, T] -> [B, V] log-probabilities of the next item after the last position; ``stats`` from
        ``serving_stats`` (evaluating many batches on the same parameters computes it once)."""
        return self.head.log_prob(self.encode(inputs)[:, -1], stats)

    def top_k(self, inputs: jax.Array, n: int, stats=None):
        """Top-n next items after the last position (the head's own top_k).

        ``stats``: the head's ``cluster_stats()`` (see ``serving_stats``), computed once per model
        instead of on every call.
        """
        return self.head.top_k(self.encode(inputs)[:, -1], n, stats)

    def serving_stats(self):
        """What ``top_k`` and ``last_log_prob`` can reuse across calls: the tree softmax's cluster
        statistics, a TT-Rec table's rebuilt rows (else None)."""
        return self.head.cluster_stats()

    def __call__(self, inputs: jax.Array) -> jax.Array:
        # Touches every parameter; used by `init` on a tiny input.
        return self.last_log_prob(inputs)


def check_tying(embedding: str, softmax: str, tie_embeddings: bool) -> None:
    """Raises ConfigError for a tying the two layers cannot share tables for.

    The full and sampled softmax tie to any item table (``logits = h' E^T``); the tree softmax
    has its own cluster layout and ties to the block-wise embedding of the same clusters only.
    ``tie_projections`` is a sub-option of tied CpRec and has no effect elsewhere (untied, or a
    full model, which has no projections), so that an ablation can untie a tied preset with one key.
    """
    if tie_embeddings and softmax == "tree" and embedding != "blockwise":
        raise ConfigError(
            f"config.model.tie_embeddings=True with the tree softmax needs model.embedding=blockwise (its clusters' "
            f"tables), got {embedding}; use model.softmax=full or sampled, or set model.tie_embeddings=False")


def target_mask(inputs, targets):
    """Positions that carry loss: a real target predicted from a real (non-padding) input.

    A user's first item sits after left padding; predicting it from padding
    alone would only learn popularity, so it is left out (cprec.data makes
    every other item a target exactly once).
    """
    return (targets > 0) & (inputs > 0)

