"""Causal dilated 1-D convolution written as shifted slices and one matmul.

XLA runs one [B*T, k*C] @ [k*C, C_out] matmul well on CPU and GPU, whereas its
dilated convolutions have been slow on GPU. `tests/test_conv.py` checks this
against `lax.conv_general_dilated`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def causal_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dilation: int) -> jax.Array:
    """Causal dilated convolution.

    Args:
      x: [B, T, C] inputs.
      kernel: [k, C, C_out]; tap i looks back (k - 1 - i) * dilation steps.
      bias: [C_out] or None.
      dilation: static dilation >= 1.
    Returns:
      [B, T, C_out]; output t depends on inputs at positions <= t only.
    """
    pad = (kernel.shape[0] - 1) * dilation
    # Left (causal) padding only: position t never sees t+1..T.
    return padded_conv(jnp.pad(x, ((0, 0), (pad, 0), (0, 0))), kernel, bias, dilation)


def padded_conv(xp: jax.Array, kernel: jax.Array, bias: jax.Array | None, dilation: int) -> jax.Array:
    """``causal_conv`` of an input whose first (k - 1) * dilation positions are its left context:
    [B, (k-1)*dilation + T, C] -> [B, T, C_out] (zeros as the context is ``causal_conv``)."""
    k = kernel.shape[0]
    t = xp.shape[1] - (k - 1) * dilation
    return tap_matmul([xp[:, i * dilation : i * dilation + t, :] for i in range(k)], kernel, bias)


def padded_conv_fast(xp: jax.Array, kernel: jax.Array, bias: jax.Array | None, dilation: int) -> jax.Array:
    """``padded_conv`` by the backend's faster kernel, for inference: on CPU and for more than one
    row XLA's own dilated convolution, which skips copying the taps; elsewhere the matmul. A single
    row keeps the matmul, which is as fast there (both measured by ``python -m
    cprec.bench.serving_conv``; figures in docs/benchmarks.md). Equal to ``padded_conv`` up to
    float rounding (the taps sum in another order)."""
    if jax.default_backend() != "cpu" or xp.shape[0] == 1:
        return padded_conv(xp, kernel, bias, dilation)
    y = lax.conv_general_dilated(xp, kernel, window_strides=(1,), padding="VALID", rhs_dilation=(dilation,),
                                 dimension_numbers=("NWC", "WIO", "NWC"))
    return y if bias is None else y + bias


def tap_matmul(taps: list[jax.Array], kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """The conv's one matmul: the k taps [..., C] (oldest first) on channels times [k*C, C_out]."""
    k, c_in, c_out = kernel.shape
    y = jnp.concatenate(taps, axis=-1) @ kernel.reshape(k * c_in, c_out)
    return y if bias is None else y + bias
