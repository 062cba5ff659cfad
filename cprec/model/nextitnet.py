"""NextItNet (Yuan et al., WSDM 2019) with CpRec's compression options.

item ids -> input embedding (an item table: full, block-wise, or a rival compression, see
``cprec.model.tables``) -> residual blocks of dilated causal convs -> output layer (full or
sampled softmax, possibly tied to the input table, or the two-level tree softmax).
Training predicts every position of the window at once.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.errors import ConfigError
from cprec.model.conv import causal_conv, padded_conv, padded_conv_fast, tap_matmul
from cprec.model.full_softmax import FullSoftmax
from cprec.model.sampled_softmax import Negatives, SampledSoftmax
from cprec.model.sharing import conv_sharing_index
from cprec.model.tables import make_table
from cprec.model.tree_softmax import BlockwiseSoftmax


# Far below the activations' variance (order 1): it only guards the division.
LAYER_NORM_EPSILON = 1e-6


def conv_layers(dilations: tuple[int, ...], sharing: str) -> tuple[tuple[int, int], ...]:
    """(dilation, unique kernel index) per conv layer of a residual stack, in order (block 0 conv 1,
    block 0 conv 2, block 1 conv 1, ...)."""
    per_layer = [d for r in dilations for d in (r, 2 * r)]
    return tuple(zip(per_layer, conv_sharing_index(sharing, len(dilations))[1]))


class ResidualStack(nn.Module):
    """Residual blocks: conv(r) -> LN -> ReLU -> conv(2r) -> LN -> ReLU, plus the input.

    Conv weights live in one stacked tensor [n_unique, k, C, C] indexed by the
    sharing scheme; layer norms are always per layer.

    One stack for training and serving: ``__call__`` (training and ``encode``: zeros before the
    window), ``window`` (a chosen left context per conv layer, e.g. the activations of padding,
    returning each layer's inputs too) and ``step`` (one new position per row, each layer's taps
    read from a caller's cache: the incremental encoder of ``cprec.serve.incremental``).
    """

    dim: int
    dilations: tuple[int, ...]  # one per residual block
    sharing: str = "none"
    kernel_size: int = 3

    def setup(self) -> None:
        n_unique, _ = conv_sharing_index(self.sharing, len(self.dilations))
        k, c = self.kernel_size, self.dim
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(1, 2), out_axis=3, batch_axis=(0,)
        )
        self.kernels = self.param("kernels", init, (n_unique, k, c, c))
        self.biases = self.param("biases", nn.initializers.zeros, (n_unique, c))
        for b in range(len(self.dilations)):
            for j in range(2):  # named as the compact module named them: ln_{block}_{conv}
                setattr(self, f"ln_{b}_{j}", nn.LayerNorm(epsilon=LAYER_NORM_EPSILON))

    def _norm(self, layer: int, z: jax.Array) -> jax.Array:
        return nn.relu(getattr(self, f"ln_{layer // 2}_{layer % 2}")(z))

    def conv_layers(self) -> tuple[tuple[int, int], ...]:
        return conv_layers(self.dilations, self.sharing)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.window(x, None, conv=None)[0]

    def window(self, x: jax.Array, prefixes: tuple[jax.Array, ...] | None = None,
               conv: Callable | None = padded_conv_fast) -> tuple[jax.Array, list[jax.Array]]:
        """The stack over [B, T, C] with a left context per conv layer: ``prefixes[l]`` [B, (k-1)*d_l, C]
        are the inputs before the window (None: zeros, as ``__call__``). ``conv(prefixed, kernel,
        bias, dilation)`` computes a layer (None: ``causal_conv`` on zeros, training's own; the
        inputs are then not returned). Returns the [B, T, C] outputs and, per conv layer, its
        [B, (k-1)*d + T, C] prefixed inputs."""
        inputs = []
        for b in range(len(self.dilations)):
            y = x
            for j in range(2):
                layer = 2 * b + j
                dilation, u = self.conv_layers()[layer]
                if conv is None and prefixes is None:
                    z = causal_conv(y, self.kernels[u], self.biases[u], dilation)
                else:
                    pad = (self.kernel_size - 1) * dilation
                    pre = jnp.zeros((y.shape[0], pad, y.shape[2]), y.dtype) if prefixes is None else prefixes[layer]
                    yp = jnp.concatenate([pre, y], axis=1)
                    inputs.append(yp)
                    z = (conv or padded_conv)(yp, self.kernels[u], self.biases[u], dilation)
                y = self._norm(layer, z)
            x = x + y
        return x, inputs

    def step(self, x: jax.Array, taps: Callable[[int], list[jax.Array]]) -> tuple[jax.Array, list[jax.Array]]:
        """One new position per row: x [B, C] -> (output [B, C], each conv layer's input [B, C]).
        ``taps(layer)`` gives the layer's k - 1 earlier inputs [B, C], oldest first (its cache)."""
        inputs = []
        for b in range(len(self.dilations)):
            y = x
            for j in range(2):
                layer = 2 * b + j
                u = self.conv_layers()[layer][1]
                inputs.append(y)
                z = tap_matmul([*taps(layer), y], self.kernels[u], self.biases[u])
                y = self._norm(layer, z)
            x = x + y
        return x, inputs


class NextItNet(nn.Module):
    """NextItNet with a choice of input embedding, output layer and conv sharing."""

    num_items: int  # V, including padding id 0
    dim: int
    dilations: tuple[int, ...]
    sharing: str = "none"
    kernel_size: int = 3
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

    def setup(self) -> None:
        check_tying(self.embedding, self.softmax, self.tie_embeddings)
        self.embed = make_table(self.embedding, self.num_items, self.dim, self.cutoffs, self.ranks, self.table_options)
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

