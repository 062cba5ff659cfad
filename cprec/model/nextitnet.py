"""NextItNet (Yuan et al., WSDM 2019) with CpRec's compression options.

item ids -> input embedding (full or block-wise) -> residual blocks of dilated
causal convs -> output layer (full softmax or two-level tree softmax).
Training predicts every position of the window at once.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from cprec.errors import ConfigError
from cprec.model.conv import causal_conv
from cprec.model.embedding import BlockwiseEmbedding
from cprec.model.full_softmax import FullSoftmax
from cprec.model.sampled_softmax import Negatives, SampledSoftmax
from cprec.model.sharing import conv_sharing_index
from cprec.model.tree_softmax import BlockwiseSoftmax


# Far below the activations' variance (order 1): it only guards the division.
LAYER_NORM_EPSILON = 1e-6


class ResidualStack(nn.Module):
    """Residual blocks: conv(r) -> LN -> ReLU -> conv(2r) -> LN -> ReLU, plus the input.

    Conv weights live in one stacked tensor [n_unique, k, C, C] indexed by the
    sharing scheme; layer norms are always per layer.
    """

    dim: int
    dilations: tuple[int, ...]  # one per residual block
    sharing: str = "none"
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_unique, index = conv_sharing_index(self.sharing, len(self.dilations))
        k, c = self.kernel_size, self.dim
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(1, 2), out_axis=3, batch_axis=(0,)
        )
        kernels = self.param("kernels", init, (n_unique, k, c, c))
        biases = self.param("biases", nn.initializers.zeros, (n_unique, c))
        for b, r in enumerate(self.dilations):
            y = x
            for j, dilation in enumerate((r, 2 * r)):
                u = index[2 * b + j]
                y = causal_conv(y, kernels[u], biases[u], dilation)
                y = nn.relu(nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, name=f"ln_{b}_{j}")(y))
            x = x + y
        return x


class NextItNet(nn.Module):
    """NextItNet with a choice of input embedding, output layer and conv sharing."""

    num_items: int  # V, including padding id 0
    dim: int
    dilations: tuple[int, ...]
    sharing: str = "none"
    kernel_size: int = 3
    embedding: str = "full"  # 'full' | 'blockwise'
    softmax: str = "full"  # 'full' | 'sampled' (the full table, trained on sampled negatives) | 'tree'
    cutoffs: tuple[int, ...] = ()  # cluster boundaries ending with V (block-wise parts)
    ranks: tuple[int, ...] = ()  # per-cluster ranks, ranks[0] == dim
    capacities: tuple[int, ...] | None = None  # static tail-cluster token capacities (tree softmax)
    dropout: float = 0.0  # on the input embedding, training only
    # The output layer shares the input embedding's item tables (full: logits = h' E^T; CpRec: each
    # cluster's table); needs embedding/softmax full/full or blockwise/tree.
    tie_embeddings: bool = False
    tie_projections: bool = False  # tied CpRec: the tail projections too (no effect without tied CpRec)
    output_projection: bool = False  # h' = W h + b (d x d) before the output layer

    def setup(self) -> None:
        check_tying(self.embedding, self.softmax, self.tie_embeddings)
        if self.embedding == "blockwise":
            self.embed = BlockwiseEmbedding(self.num_items, self.dim, self.cutoffs, self.ranks)
        else:
            self.embed = nn.Embed(
                self.num_items, self.dim, embedding_init=nn.initializers.normal(stddev=self.dim**-0.5)
            )
        self.drop = nn.Dropout(self.dropout)
        self.stack = ResidualStack(self.dim, self.dilations, self.sharing, self.kernel_size)
        tied = self.embed if self.tie_embeddings else None
        if self.softmax == "tree":
            self.head = BlockwiseSoftmax(self.dim, self.num_items, self.cutoffs, self.ranks, self.capacities,
                                         tied_to=tied, tie_projections=self.tie_projections and tied is not None,
                                         projection=self.output_projection)
        else:
            head = SampledSoftmax if self.softmax == "sampled" else FullSoftmax
            self.head = head(self.dim, self.num_items, tied_to=tied, projection=self.output_projection)

    def encode(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        """[B, T] item ids -> [B, T, dim] hidden states (causal)."""
        x = self.embed(inputs)
        if self.dropout > 0:
            x = self.drop(x, deterministic=not train)
        return self.stack(x)

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

    def last_log_prob(self, inputs: jax.Array) -> jax.Array:
        """[B, T] -> [B, V] log-probabilities of the next item after the last position."""
        return self.head.log_prob(self.encode(inputs)[:, -1])

    def top_k(self, inputs: jax.Array, n: int, stats=None):
        """Top-n next items after the last position (the head's own top_k).

        ``stats``: the tree softmax's ``cluster_stats()`` (see ``serving_stats``), computed once
        per model instead of on every call; ignored by the full softmax.
        """
        return self.head.top_k(self.encode(inputs)[:, -1], n, stats)

    def serving_stats(self):
        """What ``top_k`` can reuse across calls: the tree softmax's cluster statistics (else None)."""
        return self.head.cluster_stats()

    def __call__(self, inputs: jax.Array) -> jax.Array:
        # Touches every parameter; used by `init` on a tiny input.
        return self.last_log_prob(inputs)


def check_tying(embedding: str, softmax: str, tie_embeddings: bool) -> None:
    """Raises ConfigError for a tying the two layers cannot share tables for.

    ``tie_projections`` is a sub-option of tied CpRec and has no effect elsewhere (untied, or a
    full model, which has no projections), so that an ablation can untie a tied preset with one key.
    """
    if tie_embeddings and (embedding, softmax) not in (("full", "full"), ("full", "sampled"), ("blockwise", "tree")):
        raise ConfigError(
            f"config.model.tie_embeddings=True needs embedding/softmax full/full, full/sampled or blockwise/tree (tables of the "
            f"same shapes), got {embedding}/{softmax}; set model.tie_embeddings=False")


def target_mask(inputs, targets):
    """Positions that carry loss: a real target predicted from a real (non-padding) input.

    A user's first item sits after left padding; predicting it from padding
    alone would only learn popularity, so it is left out (cprec.data makes
    every other item a target exactly once).
    """
    return (targets > 0) & (inputs > 0)

