import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.model.nextitnet import NextItNet, ResidualStack
from cprec.model.sharing import SHARING_SCHEMES, conv_sharing_index

V, D = 40, 8
DILATIONS = (1, 2, 1, 4)


def _model(**kw):
    return NextItNet(num_items=V, dim=D, dilations=DILATIONS, **kw)


def _params(model, seed=0):
    return model.init(jax.random.PRNGKey(seed), jnp.ones((1, 2), jnp.int32))["params"]


def _seq(seed=0, b=3, t=12):
    return jnp.asarray(np.random.default_rng(seed).integers(1, V, size=(b, t)), jnp.int32)


def test_no_future_leakage():
    model = _model()
    params = _params(model)
    x = np.array(_seq())
    h1 = model.apply({"params": params}, jnp.asarray(x), method=NextItNet.encode)
    t = 6
    x2 = x.copy()
    x2[:, t + 1 :] = np.random.default_rng(9).integers(1, V, size=x2[:, t + 1 :].shape)
    h2 = model.apply({"params": params}, jnp.asarray(x2), method=NextItNet.encode)
    np.testing.assert_array_equal(h1[:, : t + 1], h2[:, : t + 1])
    assert not np.allclose(h1[:, t + 1 :], h2[:, t + 1 :])


def test_loss_matches_log_prob_and_masks_padding():
    model = _model()
    params = _params(model)
    x = _seq(1)
    targets = np.array(_seq(2))
    targets[0, :5] = 0  # padding targets carry no loss
    loss, count = model.apply({"params": params}, x, jnp.asarray(targets), method=NextItNet.loss)
    h = model.apply({"params": params}, x, method=NextItNet.encode)
    lp = jax.nn.log_softmax(h @ params["head"]["kernel"], axis=-1)
    nll = -np.take_along_axis(np.asarray(lp), targets[..., None], -1)[..., 0]
    assert int(count) == (targets > 0).sum()
    np.testing.assert_allclose(loss, nll[targets > 0].mean(), rtol=1e-5)


def _stack_param_count(scheme: str, blocks: int, k: int = 3) -> int:
    n_unique = {"none": 2 * blocks, "cross_layer": 1, "cross_block": 2, "adjacent_layer": blocks,
                "adjacent_block": blocks}[scheme]
    return n_unique * (k * D * D + D) + 2 * blocks * 2 * D  # kernels + biases + per-layer LN scale/bias


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_stack_param_count_formula(scheme):
    params = _params(_model(sharing=scheme))
    n = sum(x.size for x in jax.tree.leaves(params["stack"]))
    assert n == _stack_param_count(scheme, len(DILATIONS))


def _untied_params(shared_params, scheme):
    """Unshared stack params whose kernels were copied from the shared ones by hand."""
    _, index = conv_sharing_index(scheme, len(DILATIONS))
    p = jax.tree.map(lambda x: x, shared_params)
    p["kernels"] = shared_params["kernels"][np.array(index)]
    p["biases"] = shared_params["biases"][np.array(index)]
    return p


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [s for s in SHARING_SCHEMES if s != "none"])
def test_shared_forward_equals_hand_tied_and_grad_sums_uses(scheme):
    shared = ResidualStack(D, DILATIONS, scheme)
    plain = ResidualStack(D, DILATIONS, "none")
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 10, D))
    ps = shared.init(jax.random.PRNGKey(0), x)["params"]
    # LayerNorm params are per layer in both; make them non-trivial.
    ps = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), ps)
    pu = _untied_params(ps, scheme)
    np.testing.assert_allclose(shared.apply({"params": ps}, x), plain.apply({"params": pu}, x), rtol=1e-6, atol=1e-6)

    def loss(stack, p):
        return (stack.apply({"params": p}, x) ** 2).sum()

    gs = jax.grad(lambda p: loss(shared, p))(ps)
    gu = jax.grad(lambda p: loss(plain, p))(pu)
    n_unique, index = conv_sharing_index(scheme, len(DILATIONS))
    summed = np.zeros_like(np.asarray(gs["kernels"]))
    for layer, u in enumerate(index):
        summed[u] += np.asarray(gu["kernels"][layer])
    np.testing.assert_allclose(gs["kernels"], summed, rtol=1e-4, atol=1e-5)
    assert gs["kernels"].shape[0] == n_unique


def test_full_softmax_loss_gradient_matches_plain_log_softmax():
    from cprec.model.full_softmax import FullSoftmax

    head = FullSoftmax(D, V)
    h = jax.random.normal(jax.random.PRNGKey(0), (20, D))
    targets = jnp.asarray(np.random.default_rng(0).integers(1, V, size=20), jnp.int32)
    mask = jnp.arange(20) % 3 != 0
    params = head.init(jax.random.PRNGKey(1), h)["params"]

    def fused(p, h):
        return head.apply({"params": p}, h, targets, mask, method=FullSoftmax.loss)[0]

    def plain(p, h):
        lp = jax.nn.log_softmax(h @ p["kernel"], axis=-1)
        nll = -jnp.take_along_axis(lp, targets[:, None], -1)[:, 0]
        return (nll * mask).sum() / mask.sum()

    np.testing.assert_allclose(fused(params, h), plain(params, h), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(fused, (0, 1))(params, h)), jax.tree.leaves(jax.grad(plain, (0, 1))(params, h))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softmax", ["full", "tree"])
def test_output_layers_share_one_interface(softmax):
    from cprec.model import OutputLayer
    from cprec.model.full_softmax import FullSoftmax
    from cprec.model.tree_softmax import BlockwiseSoftmax

    kw = {"softmax": softmax, "cutoffs": (10, 25, V), "ranks": (D, 4, 2)} if softmax == "tree" else {}
    model = _model(**kw)
    params = _params(model)
    x = _seq()
    layer = (BlockwiseSoftmax(D, V, (10, 25, V), (D, 4, 2)) if softmax == "tree" else FullSoftmax(D, V))
    assert isinstance(layer, OutputLayer)
    stats = model.apply({"params": params}, method=NextItNet.serving_stats)
    scores, ids, expanded = model.apply({"params": params}, x, 5, stats, method=NextItNet.top_k)
    assert scores.shape == ids.shape == (3, 5) and ids.dtype == jnp.int32 and expanded.dtype == jnp.bool_
    assert expanded.shape == (3, 2 if softmax == "tree" else 0)
    full = model.apply({"params": params}, x, method=NextItNet.last_log_prob)
    want_scores, want_ids = jax.lax.top_k(full.at[:, 0].set(-jnp.inf), 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    _, count = model.apply({"params": params}, x[:, :-1], x[:, 1:], method=NextItNet.loss)
    assert count.dtype == jnp.int32 and int(count) == 3 * 11
