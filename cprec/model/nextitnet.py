"""NextItNet (Yuan et al., WSDM 2019) with CpRec's compression options.

item ids -> input embedding (an item table: full, block-wise, or a rival compression, see
``cprec.model.tables``) -> residual blocks of dilated causal convs -> output layer (full or
sampled softmax, possibly tied to the input table, or the two-level tree softmax).
Training predicts every position of the window at once.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cprec.model.conv import causal_conv, padded_conv, padded_conv_fast, tap_matmul
from cprec.model.sequential import SequentialRecommender
from cprec.model.sharing import conv_sharing_index


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


class NextItNet(SequentialRecommender):
    """NextItNet: the dilated causal conv stack as the encoder of ``SequentialRecommender``."""

    dilations: tuple[int, ...] = (1, 4)
    kernel_size: int = 3

    def setup(self) -> None:
        self.setup_items()
        self.stack = ResidualStack(self.dim, self.dilations, self.sharing, self.kernel_size)

    def encode(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        """[B, T] item ids -> [B, T, dim] hidden states (causal)."""
        return self.stack(self.embed_items(inputs, train))
