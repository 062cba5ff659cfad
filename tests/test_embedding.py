import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.model.tables.blockwise import BlockwiseEmbedding, blockwise_param_count
from cprec.errors import ConfigError

V, D = 50, 16
CUTOFFS, RANKS = (10, 25, 50), (16, 4, 1)


def _init(module, ids):
    return module.init(jax.random.PRNGKey(0), ids)


def test_param_layout_and_count():
    module = BlockwiseEmbedding(V, D, CUTOFFS, RANKS)
    params = _init(module, jnp.zeros((2, 3), jnp.int32))["params"]
    shapes = {k: v.shape for k, v in params.items()}
    assert shapes == {"head": (10, 16), "tail_1_emb": (15, 4), "tail_1_proj": (4, 16),
                      "tail_2_emb": (25, 1), "tail_2_proj": (1, 16)}
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == 10 * 16 + 15 * 4 + 25 * 1 + (4 + 1) * 16
    assert n == blockwise_param_count(CUTOFFS, RANKS, D)


def test_matches_per_cluster_formula():
    module = BlockwiseEmbedding(V, D, CUTOFFS, RANKS)
    ids = jnp.arange(V).reshape(5, 10)
    params = _init(module, ids)
    out = jax.jit(module.apply)(params, ids)
    assert out.shape == (5, 10, D)
    p = params["params"]
    bounds = (0,) + CUTOFFS
    for x in range(V):
        j = int(np.searchsorted(CUTOFFS, x, side="right"))
        if j == 0:
            want = p["head"][x]
        else:
            want = p[f"tail_{j}_emb"][x - bounds[j]] @ p[f"tail_{j}_proj"]
        np.testing.assert_allclose(out.reshape(-1, D)[x], want, rtol=1e-6, atol=1e-6)


def test_single_cluster_is_plain_lookup():
    module = BlockwiseEmbedding(V, D, (V,), (D,))
    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 7), 0, V)
    params = _init(module, ids)
    assert list(params["params"]) == ["head"]
    out = module.apply(params, ids)
    np.testing.assert_array_equal(out, jnp.take(params["params"]["head"], ids, axis=0))
    embed = nn.Embed(V, D)
    np.testing.assert_array_equal(out, embed.apply({"params": {"embedding": params["params"]["head"]}}, ids))


def test_gradients_reach_only_used_rows():
    module = BlockwiseEmbedding(V, D, CUTOFFS, RANKS)
    ids = jnp.array([[1, 12, 40]])
    params = _init(module, ids)
    grads = jax.grad(lambda p: module.apply(p, ids).sum())(params)["params"]
    assert np.count_nonzero(np.abs(grads["head"]).sum(1)) == 1
    assert np.count_nonzero(np.abs(grads["tail_1_emb"]).sum(1)) == 1
    assert np.count_nonzero(np.abs(grads["tail_2_emb"]).sum(1)) == 1


@pytest.mark.parametrize("cutoffs, ranks, key", [
    ((10, 25, 50), (16, 4), "model.ranks"),
    ((10, 25, 50), (16, 4, 0), "model.ranks"),
    ((10, 25, 50), (8, 4, 1), "model.ranks"),
    ((25, 10, 50), (16, 4, 1), "model.cutoffs"),
    ((10, 25, 60), (16, 4, 1), "model.cutoffs"),
])
def test_invalid_config(cutoffs, ranks, key):
    with pytest.raises(ConfigError, match=key):
        _init(BlockwiseEmbedding(V, D, cutoffs, ranks), jnp.zeros((1,), jnp.int32))
