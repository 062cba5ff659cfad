import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.model.conv import causal_conv


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
