import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.model.conv import causal_conv, padded_conv, padded_conv_fast


@pytest.mark.parametrize("dilation,k", [(1, 3), (2, 3), (4, 3), (3, 2)])
def test_causal_conv_matches_lax_conv(dilation, k):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 17, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, 5, 6)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    ref = jax.lax.conv_general_dilated(
        x, w, window_strides=(1,), padding=[((k - 1) * dilation, 0)], rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"),
    ) + b
    np.testing.assert_allclose(causal_conv(x, w, b, dilation), ref, rtol=1e-5, atol=1e-5)


def test_causal_conv_is_causal():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 12, 4)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
    y1 = causal_conv(jnp.asarray(x), w, None, 2)
    x[:, 7:] = rng.normal(size=(1, 5, 4))
    y2 = causal_conv(jnp.asarray(x), w, None, 2)
    np.testing.assert_array_equal(y1[:, :7], y2[:, :7])
    assert not np.allclose(y1[:, 7:], y2[:, 7:])


@pytest.mark.parametrize("dilation,k", [(1, 3), (8, 3), (3, 2)])
def test_padded_conv_fast_matches_the_matmul(dilation, k):
    # The serving encoder's conv (XLA's dilated conv on CPU) against the model's shifted-slice
    # matmul, on an input that carries its own left context.
    rng = np.random.default_rng(2)
    xp = jnp.asarray(rng.normal(size=(3, (k - 1) * dilation + 11, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, 8, 8)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    fast = jax.jit(padded_conv_fast, static_argnums=3)(xp, w, b, dilation)
    assert fast.shape == (3, 11, 8)
    np.testing.assert_allclose(fast, padded_conv(xp, w, b, dilation), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(padded_conv_fast(xp, w, None, dilation), padded_conv(xp, w, None, dilation),
                               rtol=1e-5, atol=1e-5)
