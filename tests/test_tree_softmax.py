import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from cprec.errors import ConfigError
from cprec.model.tree_softmax import BlockwiseSoftmax, _cluster_bound, tree_cluster_stats

V, D = 60, 16
CUTOFFS, RANKS = (12, 24, 40, 60), (16, 4, 2, 1)
N_TAIL = len(CUTOFFS) - 1

# Inputs come from numpy and every computation runs inside one jit per test: eager JAX compiles
# each small op separately, which would dominate the run time of these tiny tests.


def _module(capacities=None) -> BlockwiseSoftmax:
    return BlockwiseSoftmax(D, V, CUTOFFS, RANKS, capacities)


@pytest.fixture(scope="module")
def params():
    """Capacities do not change the parameters, so every test shares one initialisation."""
    return jax.jit(_module().init)(jax.random.PRNGKey(0), jnp.zeros((1, D)))


def _h(n, seed=1, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, D)) * scale, jnp.float32)


def _ref_loss(module, params, h, targets, mask):
    lp = module.apply(params, h, method=module.log_prob)
    nll = -jnp.take_along_axis(lp, targets[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.sum(mask)


def _tail_heavy_batch(n, seed=2):
    """Targets mostly in the tail clusters (so small capacities overflow), a few masked rows."""
    rng = np.random.default_rng(seed)
    targets = np.where(rng.uniform(size=n) < 0.2, rng.integers(1, CUTOFFS[0], n), rng.integers(CUTOFFS[0], V, n))
    mask = (np.arange(n) % 7) != 3
    targets = np.where(mask, targets, 0)  # padding targets under the mask
    return jnp.asarray(targets, jnp.int32), jnp.asarray(mask)


def test_param_layout(params):
    assert {k: v.shape for k, v in params["params"].items()} == {
        "head": (D, 12 + 3),
        "tail_1_proj": (D, 4), "tail_1_out": (4, 12),
        "tail_2_proj": (D, 2), "tail_2_out": (2, 16),
        "tail_3_proj": (D, 1), "tail_3_out": (1, 20),
    }


def test_log_prob_is_a_distribution_with_tree_semantics(params):
    module = _module()
    h = _h(5)

    @jax.jit
    def run(params, h):
        p = params["params"]
        head_lp = jax.nn.log_softmax(h @ p["head"])
        tail_2 = head_lp[:, 12 + 1, None] + jax.nn.log_softmax(h @ p["tail_2_proj"] @ p["tail_2_out"])
        return module.apply(params, h), module.apply(params, h.reshape(5, 1, D)), head_lp, tail_2

    lp, lp_3d, head_lp, tail_2 = run(params, h)
    assert lp.shape == (5, V)
    np.testing.assert_allclose(jnp.exp(lp).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(lp[:, :12], head_lp[:, :12], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp[:, 24:40], tail_2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp_3d, lp, rtol=1e-6)  # leading dims are flattened


# (8, 8, 32) in test_blocked_paths. Without capacities, 300 rows route the clusters' tokens into
# different ones of the 64 / 128 / 256 / 300-row buffers.
@pytest.mark.parametrize("capacities, n", [pytest.param(None, 64, marks=pytest.mark.slow), (None, 300), ((8, 8, 8), 64)])
def test_loss_and_grads_match_reference(params, capacities, n):
    module = _module(capacities)
    h = _h(n)
    targets, mask = _tail_heavy_batch(n)
    routed = np.bincount(np.searchsorted(CUTOFFS, np.asarray(targets)[np.asarray(mask)], side="right"),
                         minlength=4)[1:]
    if capacities == (8, 8, 8):
        assert (routed > 8).all(), "this case must overflow every tail cluster"
    if n == 300:
        assert len(set(np.searchsorted([64, 128, 256], routed))) >= 2, "the clusters must use different buffers"

    def loss(p, h):
        return module.apply(p, h, targets, mask, method=module.loss)

    @jax.jit
    def run(params, h):
        ours = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, h)
        ref = jax.value_and_grad(lambda p, h: _ref_loss(module, p, h, targets, mask), argnums=(0, 1))(params, h)
        return ours, ref, loss(params, h)  # the last one runs the forward-only path

    ((value, count), grads), (ref, ref_grads), (forward_only, _) = run(params, h)
    assert int(count) == int(mask.sum())
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    np.testing.assert_allclose(forward_only, ref, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_loss_flattens_leading_dims_and_handles_empty_mask(params):
    module = _module((8, 8, 8))
    h = _h(24).reshape(2, 12, D)
    targets, mask = _tail_heavy_batch(24)

    @jax.jit
    def run(params, h):
        loss = lambda m: module.apply(params, h, targets.reshape(2, 12), m.reshape(2, 12), method=module.loss)
        return loss(mask), loss(jnp.zeros_like(mask)), _ref_loss(module, params, h.reshape(-1, D), targets, mask)

    (value, count), (empty, empty_count), ref = run(params, h)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    assert int(count) == int(mask.sum())
    assert float(empty) == 0.0 and int(empty_count) == 0


def _assert_topk_matches(scores, ids, lp, n):
    """Exact top-n up to ties: same scores, and the returned ids really score that."""
    scores, ids, lp = np.asarray(scores), np.asarray(ids), np.array(lp)
    lp[:, 0] = -np.inf  # padding is never recommended
    ref_s, ref_i = (np.asarray(x) for x in lax.top_k(jnp.asarray(lp), n))
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(lp, ids, axis=1), scores, rtol=1e-5, atol=1e-5)
    assert all(len(set(row)) == n for row in ids)
    # Where the reference scores are not (nearly) tied, the ids must be the same.
    gaps = np.abs(np.diff(ref_s, axis=1)) > 1e-4
    distinct = np.ones_like(ref_s, bool)
    distinct[:, :-1] &= gaps
    distinct[:, 1:] &= gaps
    np.testing.assert_array_equal(ids[distinct], ref_i[distinct])


@pytest.mark.parametrize("batch, n", [(1, 5), (7, 15)])  # n = 15 > k1 = 12: the head alone cannot fill the list
def test_top_k_random_params(params, batch, n):
    module = _module()
    h = _h(batch, seed=3, scale=3.0)
    run = jax.jit(lambda p, h: (module.apply(p, h, n, method=module.top_k), module.apply(p, h)))
    (scores, ids, expanded), lp = run(params, h)
    assert scores.shape == ids.shape == (batch, n) and expanded.shape == (batch, N_TAIL)
    _assert_topk_matches(scores, ids, lp, n)


@pytest.fixture(scope="module")
def trained(params):
    """A few Adam steps on contexts whose targets are mostly head items: a peaky head."""
    module = _module((8, 8, 8))
    n = 48
    h = _h(n, seed=5)
    rng = np.random.default_rng(6)
    targets = jnp.asarray(np.where(np.arange(n) % 8 == 0, rng.integers(12, V, n), rng.integers(1, 6, n)), jnp.int32)
    mask = jnp.ones((n,), bool)
    opt = optax.adam(0.05)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            loss, g = jax.value_and_grad(lambda p: module.apply(p, h, targets, mask, method=module.loss)[0])(params)
            updates, state = opt.update(g, state)
            return (optax.apply_updates(params, updates), state), loss
        (params, _), losses = lax.scan(step, (params, opt.init(params)), None, length=150)
        return params, losses

    trained_params, losses = train(params)
    assert losses[-1] < 0.5 * losses[0]
    return module, trained_params, h


@pytest.mark.parametrize("batch", [1, 48])
def test_top_k_trained_params_skips_clusters(trained, batch):
    module, params, h = trained
    h = h[:batch]
    n = 5
    run = jax.jit(lambda p, h: (module.apply(p, h, n, method=module.top_k), module.apply(p, h),
                                jax.nn.log_softmax(h @ p["params"]["head"])[:, 12:]))
    (scores, ids, expanded), lp, tok_lp = run(params, h)
    _assert_topk_matches(scores, ids, lp, n)
    expanded, tok_lp, kth = np.asarray(expanded), np.asarray(tok_lp), np.asarray(scores)[:, -1:]
    assert expanded.sum() < batch * N_TAIL, "a peaky head must let some clusters be skipped"
    # No item of a skipped cluster beats the row's n-th best item.
    lp = np.asarray(lp)
    cluster_best = np.stack([lp[:, lo:hi].max(axis=1) for lo, hi in zip(CUTOFFS[:-1], CUTOFFS[1:])], axis=1)
    assert (cluster_best[~expanded] <= np.broadcast_to(kth, tok_lp.shape)[~expanded] + 1e-6).all()


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_cluster_bound_is_an_upper_bound(params, scale):
    """No item of a cluster has a higher within-cluster log-prob than the bound, for any row."""
    h = _h(64, seed=7, scale=3.0)
    p = jax.tree.map(lambda x: x * scale, params)["params"]

    @jax.jit
    def run(p, h):
        outs = [p[f"tail_{j}_out"] for j in range(1, N_TAIL + 1)]
        stats = tree_cluster_stats(outs)
        res = []
        for j, (w, st) in enumerate(zip(outs, stats), start=1):
            z = h @ p[f"tail_{j}_proj"]
            res.append((jnp.max(jax.nn.log_softmax(z @ w), axis=1), _cluster_bound(z, st, w.shape[1])))
        return res

    for best, bound in run(p, h):
        assert np.all(np.asarray(best) <= np.asarray(bound) + 1e-5)
        assert np.all(np.asarray(bound) <= 0.0)
    # Uniform clusters: the bound is exact, -log k.
    zero = jax.tree.map(jnp.zeros_like, p)
    for (best, bound), k in zip(run(zero, h), np.diff(CUTOFFS)):
        np.testing.assert_allclose(bound, -np.log(k), rtol=1e-6)
        np.testing.assert_allclose(best, -np.log(k), rtol=1e-6)


@pytest.mark.slow
def test_top_k_flat_model_skips_clusters_whose_token_beats_the_nth_item(params):
    """A flat model: every cluster token beats the n-th best item, but no single tail item does."""
    module = _module()
    p = jax.tree.map(jnp.copy, params["params"])
    h = _h(32, seed=8)
    h = h.at[:, 0].set(1.0)
    # Cluster tokens get a large constant logit; tail items are nearly uniform within their cluster.
    p["head"] = p["head"].at[0, CUTOFFS[0]:].add(2.0)
    for j in range(1, N_TAIL + 1):
        p[f"tail_{j}_out"] = p[f"tail_{j}_out"] * 0.05
    flat = {"params": p}
    n = 3
    run = jax.jit(lambda p, st, h: (module.apply(p, h, n, st, method=module.top_k), module.apply(p, h),
                                    jax.nn.log_softmax(h @ p["params"]["head"])[:, CUTOFFS[0]:]))
    stats = jax.jit(lambda p: module.apply(p, method=module.cluster_stats))(flat)
    (scores, ids, expanded), lp, tok_lp = run(flat, stats, h)
    _assert_topk_matches(scores, ids, lp, n)
    kth = np.asarray(scores)[:, -1:]
    token_test = np.asarray(tok_lp) > kth
    assert token_test.mean() > 0.5, "the setting must be one where the token test alone expands a lot"
    assert np.asarray(expanded).sum() < 0.5 * token_test.sum()
    # Without stats, 32 rows derive them inside the call (lazily, per cluster): same result, same pruning.
    (scores2, ids2, expanded2), _, _ = run(flat, None, h)
    np.testing.assert_array_equal(scores2, scores)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(expanded2, expanded)
    # Below 8 rows, no statistics: the token test alone decides, and the result stays exact.
    (scores3, ids3, expanded3), lp3, tok3 = run(flat, None, h[:4])
    _assert_topk_matches(scores3, ids3, lp3, n)
    np.testing.assert_array_equal(np.asarray(expanded3), np.asarray(tok3) > np.asarray(scores3)[:, -1:])


def test_weight_stats_equal_plain_reductions():
    w = np.random.default_rng(9).normal(size=(5, 300)).astype(np.float32)
    ((w_max, w_min, w_mean, col_norm),) = jax.jit(tree_cluster_stats)([jnp.asarray(w)])
    np.testing.assert_allclose(w_max, w.max(1))
    np.testing.assert_allclose(w_min, w.min(1))
    np.testing.assert_allclose(w_mean, w.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(col_norm, np.linalg.norm(w, axis=0).max(), rtol=1e-5)


class _Parent(nn.Module):
    """How a model uses the softmax: a submodule defined in setup, called from methods."""

    def setup(self):
        self.encoder = nn.Dense(D)
        self.head = BlockwiseSoftmax(D, V, CUTOFFS, RANKS, (8, 8, 8))

    def __call__(self, x, targets, mask):
        return self.head.loss(self.encoder(x), targets, mask)

    def predict(self, x, n):
        h = self.encoder(x)
        return self.head.log_prob(h), self.head.top_k(h, n)


def test_used_from_parent_module():
    parent = _Parent()
    x = _h(16, seed=7)
    targets, mask = _tail_heavy_batch(16)

    @jax.jit
    def run(x):
        params = parent.init(jax.random.PRNGKey(0), x, targets, mask)
        h = nn.Dense(D).apply({"params": params["params"]["encoder"]}, x)
        ref = _ref_loss(_module(), {"params": params["params"]["head"]}, h, targets, mask)
        return params, parent.apply(params, x, targets, mask), parent.apply(params, x[:4], 4, method=parent.predict), ref

    params, (value, count), (lp, (scores, ids, _)), ref = run(x)
    assert set(params["params"]["head"]) == {"head"} | {f"tail_{j}_{w}" for j in (1, 2, 3) for w in ("proj", "out")}
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    _assert_topk_matches(scores, ids, lp, 4)


@pytest.mark.parametrize("kwargs, key", [
    (dict(cutoffs=(60,), ranks=(16,)), "model.cutoffs"),
    (dict(cutoffs=(12, 24, 70), ranks=(16, 4, 2)), "model.cutoffs"),
    (dict(cutoffs=(12, 24, 40, 60), ranks=(16, 4, 2)), "model.ranks"),
    (dict(cutoffs=(12, 24, 40, 60), ranks=(16, 4, 2, 1), capacities=(8, 8)), "capacities"),
])
def test_invalid_config(kwargs, key):
    module = BlockwiseSoftmax(D, V, **kwargs)
    with pytest.raises(ConfigError, match=key):
        jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, D)))


@pytest.fixture
def force_blocks(monkeypatch):
    """Route every tail cluster through the column-blocked paths used for big clusters."""
    import cprec.model.xent as xent
    monkeypatch.setattr(xent, "_BLOCK_MIN_ELEMENTS", 0)
    monkeypatch.setattr(xent, "_BLOCK_RANGE", (8, 8))  # clusters of 12, 16, 20 ids: partial blocks too


def test_blocked_paths_match_reference(params, force_blocks):
    n = 48
    module = _module((8, 8, 32))  # overflows clusters 1 and 2, not 3
    h = _h(n, seed=8, scale=2.0)
    targets, mask = _tail_heavy_batch(n, seed=12)
    routed = np.bincount(np.searchsorted(CUTOFFS, np.asarray(targets)[np.asarray(mask)], side="right"),
                         minlength=4)[1:]
    assert routed[0] > 8 and routed[1] > 8 and routed[2] <= 32 < n

    def loss(p, h):
        return module.apply(p, h, targets, mask, method=module.loss)[0]

    @jax.jit
    def run(params, h):
        return (jax.value_and_grad(loss, argnums=(0, 1))(params, h),
                jax.value_and_grad(lambda p, h: _ref_loss(module, p, h, targets, mask), argnums=(0, 1))(params, h),
                module.apply(params, h[:4], 6, method=module.top_k), module.apply(params, h[:4]))

    (value, grads), (ref, ref_grads), (scores, ids, _), lp = run(params, h)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    _assert_topk_matches(scores, ids, lp, 6)


def test_grouped_top_n_equals_lax_top_k():
    from cprec.model.tree_softmax import _top_n
    x = jnp.asarray(np.random.default_rng(10).normal(size=(3, 16 * 40 + 7)), jnp.float32)  # a ragged last group
    vals, ids = jax.jit(_top_n, static_argnums=1)(x, 5)
    ref_vals, ref_ids = lax.top_k(x, 5)
    np.testing.assert_array_equal(vals, ref_vals)
    np.testing.assert_array_equal(ids, ref_ids)


def _numpy_top_n(lp: np.ndarray, n: int, exclude: np.ndarray) -> np.ndarray:
    """Reference: the n best real items of each row, excluded ids and padding removed (a full sort)."""
    lp = lp.copy()
    lp[:, 0] = -np.inf
    for r, row in enumerate(exclude):
        lp[r, row[row >= 0]] = -np.inf
    return np.sort(lp, axis=1)[:, ::-1][:, :n]


@pytest.mark.parametrize("n", [3, 15])
def test_recommend_with_exclusions_stays_exact(params, n):
    module = _module()
    h = _h(6, seed=11, scale=3.0)
    lp = np.asarray(module.apply(params, h))
    ref_top = np.argsort(-lp, axis=1)
    # Each row excludes its own current best items across head and tail clusters, plus fillers (-1).
    exclude = np.full((6, 9), -1, np.int32)
    for r in range(6):
        exclude[r, : 2 + r] = ref_top[r, : 2 + r]
    exclude[5, 7:] = [13, 59]  # ids of two tail clusters, whatever their rank
    stats = module.apply(params, method=module.cluster_stats)
    scores, ids, expanded, exact = jax.jit(lambda p, s, h, e: module.apply(p, h, n, s, e, method=module.recommend))(
        params, stats, h, jnp.asarray(exclude))
    scores, ids = np.asarray(scores), np.asarray(ids)
    assert np.all(np.asarray(exact))
    np.testing.assert_allclose(scores, _numpy_top_n(lp, n, exclude), rtol=1e-5, atol=1e-5)
    for r in range(6):
        assert not set(ids[r]) & set(exclude[r][exclude[r] >= 0]) and 0 not in ids[r]
    np.testing.assert_allclose(np.take_along_axis(lp, ids, axis=1), scores, rtol=1e-5, atol=1e-5)


def test_cluster_budget_bounds_the_work_and_says_when_it_cut(params):
    module = _module()
    h = _h(16, seed=12, scale=0.2)  # flat contexts: most clusters' tokens beat the n-th head item
    n = 15  # more than the head's 11 real items: every row needs at least one tail cluster
    lp = np.asarray(module.apply(params, h))
    stats = module.apply(params, method=module.cluster_stats)
    run = jax.jit(lambda p, s, h, b: module.apply(p, h, n, s, None, b, method=module.recommend))
    full_s, full_i, full_exp, full_exact = run(params, stats, h, jnp.full((16,), N_TAIL, jnp.int32))
    assert np.all(np.asarray(full_exact)) and np.asarray(full_exp).sum(axis=1).max() >= 2
    np.testing.assert_allclose(full_s, _numpy_top_n(lp, n, np.full((16, 1), -1)), rtol=1e-5, atol=1e-5)
    budget = np.arange(16) % (N_TAIL + 1)  # 0, 1, 2, 3 clusters
    s, i, expanded, exact = (np.asarray(x) for x in run(params, stats, h, jnp.asarray(budget, jnp.int32)))
    assert np.all(expanded.sum(axis=1) <= budget)
    # A row is exact iff its budgeted list equals the exact one; a cut row is never reported exact.
    same = np.all(np.isclose(s, np.asarray(full_s), rtol=1e-5, atol=1e-5), axis=1)
    assert np.all(same[exact]) and not np.all(exact)
    assert np.all(exact[budget == N_TAIL])
    # Whatever the budget, the returned scores are the items' true log-probs.
    finite = np.isfinite(s)
    np.testing.assert_allclose(np.take_along_axis(lp, np.maximum(i, 0), axis=1)[finite], s[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocked", [False, True])
def test_score_of_candidates_equals_the_full_log_prob(params, blocked, request):
    if blocked:
        request.getfixturevalue("force_blocks")
    module = _module()
    h = _h(5, seed=13, scale=2.0)
    lp = np.asarray(module.apply(params, h))
    rng = np.random.default_rng(0)
    cand = rng.integers(1, V, size=(5, 7)).astype(np.int32)
    cand[0] = [1, 2, 3, 4, 5, 6, 7]  # head only: no tail normaliser needed for this row
    cand[1, :2] = [0, V]  # padding and out of range: -inf
    got = np.asarray(jax.jit(lambda p, h, c: module.apply(p, h, c, method=module.score))(params, h, jnp.asarray(cand)))
    want = np.take_along_axis(lp, np.clip(cand, 0, V - 1), axis=1)
    ok = (cand > 0) & (cand < V)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(got[~ok]))
    # Only head candidates in the whole batch: still exact (every tail cluster's normaliser skipped).
    head_only = jnp.asarray(np.tile(np.arange(1, 8, dtype=np.int32), (5, 1)))
    np.testing.assert_allclose(module.apply(params, h, head_only, method=module.score), lp[:, 1:8], rtol=1e-5, atol=1e-5)


def _round_to_tf32(x: jax.Array) -> jax.Array:
    """float32 rounded to nearest with 10 mantissa bits, as TF32 tensor cores read a matmul's inputs."""
    if x.dtype != jnp.float32:
        return x
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000)  # drop 13 of the 23 bits, rounding half up
    return lax.bitcast_convert_type(bits, jnp.float32)


@pytest.fixture
def emulated_tf32(monkeypatch):
    """Every matmul traced inside rounds its inputs as TF32 does (NVIDIA GPUs' default float32 matmul
    precision since Ampere); yields a setter for the roundoff the early stop is told the platform has."""
    import cprec.model.tree_softmax as tree
    from jax._src.lax import lax as lax_internal

    real = lax_internal.dot_general
    monkeypatch.setattr(lax_internal, "dot_general",
                        lambda lhs, rhs, *a, **k: real(_round_to_tf32(lhs), _round_to_tf32(rhs), *a, **k))
    jax.clear_caches()  # jnp.matmul's traces are cached: trace it again with the rounding
    told = {"u": 2.0**-11}
    monkeypatch.setattr(tree, "matmul_input_roundoff", lambda: told["u"])
    yield lambda u: told.update(u=u)
    monkeypatch.undo()
    jax.clear_caches()


def _near_tie_clusters(rows: int, seed: int):
    """Rank-1 tail clusters whose items nearly tie at a large logit (|z.w| = 100): TF32 rounding moves a
    logit by up to 0.05 there, which lifts one item above the others by far more than the float32
    slack, while the head's best item lies, row by row, anywhere near the clusters' best items."""
    rng = np.random.default_rng(seed)
    sizes = np.diff(CUTOFFS)
    projs = [jnp.zeros((D, 1)).at[0, 0].set(1.0) for _ in sizes]
    # Items at 1 + 0.49 ulp(TF32) round down, the one at 1 + 0.51 ulp rounds up: a 2^-10 * 100 jump.
    outs = [jnp.asarray(1.0 + 2.0**-10 * np.where(np.arange(k) == rng.integers(k), 0.51, 0.49)[None, :], jnp.float32)
            for k in sizes]
    # Head items score about log k_1 below the tokens, as cluster 1's best items do, give or take 0.03.
    head = np.zeros((D, CUTOFFS[0] + N_TAIL), np.float32)
    head[0, 1:CUTOFFS[0]] = (0.05 - np.log(sizes[0])) / 100
    head[1:, 1:CUTOFFS[0]] = rng.normal(size=(D - 1, CUTOFFS[0] - 1)) * 0.008
    h = np.concatenate([np.full((rows, 1), 100.0), rng.normal(size=(rows, D - 1))], axis=1).astype(np.float32)
    return jnp.asarray(head), projs, outs, jnp.asarray(h)


@pytest.mark.slow  # kept out of CI: another test covers this path faster (run with -m slow)
def test_early_stop_stays_exact_when_matmuls_round_like_tf32(emulated_tf32):
    from cprec.model.tree_softmax import tree_log_prob, tree_top_k

    n = 1
    misses = {}
    for told, u in (("float32", 2.0**-24), ("tf32", 2.0**-11)):
        emulated_tf32(u)
        jax.clear_caches()
        wrong = 0
        for seed in range(4):
            head, projs, outs, h = _near_tie_clusters(64, seed)
            run = jax.jit(lambda head, projs, outs, h: (
                tree_top_k(head, projs, outs, CUTOFFS, h, n, tree_cluster_stats(outs)),
                tree_log_prob(head, projs, outs, CUTOFFS, h)))
            (scores, ids, _), lp = run(head, projs, outs, h)
            lp = np.array(lp)
            lp[:, 0] = -np.inf
            wrong += int(np.sum(np.asarray(scores)[:, 0] < lp.max(axis=1)))
        misses[told] = wrong
    # Told float32 while the matmuls round like TF32, the bound skips clusters that hold the best item;
    # told the precision in use, the early stop is exact again.
    assert misses["float32"] > 0, misses
    assert misses["tf32"] == 0, misses
