"""The sampled softmax with log-Q correction against the full softmax and hand computations; its sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.config import base_config, validate_config
from cprec.errors import ConfigError
from cprec.model.nextitnet import NextItNet
from cprec.model.sampled_softmax import Negatives, SampledSoftmax
from cprec.train.sampling import Sampler
from cprec.train.step import make_batch_grads

V, D, N = 23, 8, 30


def _model(softmax: str, **kw) -> NextItNet:
    return NextItNet(num_items=V, dim=D, dilations=(1, 2), softmax=softmax, **kw)


def _batch(seed=0, rows=6, length=6):
    rng = np.random.default_rng(seed)
    batch = rng.integers(1, V, size=(rows, length + 1))
    batch[:2, :3] = 0  # left padding: masked positions
    return jnp.asarray(batch, jnp.int32)


def _every_item_once(targets) -> Negatives:
    """Every id (padding included) as a negative, without correction: the full softmax's candidates."""
    t = targets.reshape(-1)
    return Negatives(jnp.arange(V, dtype=jnp.int32), jnp.zeros(V), jnp.zeros(t.shape))


@pytest.mark.parametrize("tied", [False, True])
def test_every_item_once_without_correction_is_the_full_softmax(tied):
    kw = dict(tie_embeddings=tied, output_projection=tied)
    sampled, full = _model("sampled", **kw), _model("full", **kw)
    batch = _batch()
    params = sampled.init(jax.random.PRNGKey(0), batch[:, :-1])["params"]
    assert jax.tree.structure(params) == jax.tree.structure(full.init(jax.random.PRNGKey(0), batch[:, :-1])["params"])

    @jax.jit
    def run(params):
        x, y = batch[:, :-1], batch[:, 1:]
        of = lambda model, *neg: jax.value_and_grad(lambda p: model.apply({"params": p}, x, y, False, *neg,
                                                                          method=NextItNet.loss)[0])(params)
        return of(sampled, _every_item_once(y)), of(full), sampled.apply({"params": params}, x,
                                                                          method=NextItNet.last_log_prob), \
            full.apply({"params": params}, x, method=NextItNet.last_log_prob)

    (loss, grads), (ref, ref_grads), lp, ref_lp = run(params)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(lp, ref_lp)  # evaluation scores every item, as the full softmax does


def _head_and_params(projection=False):
    head = SampledSoftmax(D, V, projection=projection)
    params = head.init(jax.random.PRNGKey(1), jnp.zeros((1, D)))
    return head, params, np.asarray(params["params"]["kernel"], np.float64)


def _reference_nll(h, w, targets, mask, neg_ids, neg_log_count, target_log_count, log_share=None):
    """The corrected sampled-softmax NLL, by loops in numpy."""
    out = []
    n_real = int(mask.sum())
    for r in range(len(targets)):
        pos = h[r] @ w[:, targets[r]] - target_log_count[r]
        cands = [pos] + [h[r] @ w[:, i] - c for i, c in zip(neg_ids, neg_log_count) if i != targets[r]]
        if log_share is not None:
            cands += [h[r] @ w[:, targets[c]] - (log_share[c] + np.log(n_real))
                      for c in range(len(targets)) if mask[c] and targets[c] != targets[r]]
        out.append(np.log(np.sum(np.exp(cands))) - pos)
    return np.sum(np.where(mask, out, 0.0)) / mask.sum()


@pytest.mark.parametrize("in_batch", [False, True])
def test_correction_and_accidental_hits_match_a_hand_computation(in_batch):
    head, params, w = _head_and_params()
    rng = np.random.default_rng(2)
    h = rng.normal(size=(N, D))
    targets = rng.integers(1, 6, N)  # few distinct targets: in-batch hits are common
    mask = np.arange(N) % 5 != 0
    neg_ids = np.array([targets[0], 7, 7, targets[3], 15])  # two accidental hits, one duplicate
    neg_log_count = rng.normal(size=5)
    target_log_count = rng.normal(size=N)
    log_share = rng.normal(size=N) if in_batch else None
    negatives = Negatives(jnp.asarray(neg_ids, jnp.int32), jnp.asarray(neg_log_count, jnp.float32),
                          jnp.asarray(target_log_count, jnp.float32),
                          None if log_share is None else jnp.asarray(log_share, jnp.float32))
    loss, count = jax.jit(lambda p: head.apply(p, jnp.asarray(h, jnp.float32), jnp.asarray(targets, jnp.int32),
                                               jnp.asarray(mask), negatives, method=head.loss))(params)
    assert int(count) == mask.sum()
    ref = _reference_nll(h, w, targets, mask, neg_ids, neg_log_count, target_log_count, log_share)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_a_token_whose_every_negative_is_masked_has_zero_loss_and_finite_gradients():
    """Only the target is left among the candidates (all negatives are hits, the batch has one item)."""
    head, params, _ = _head_and_params(projection=True)
    h = jnp.asarray(np.random.default_rng(3).normal(size=(4, D)), jnp.float32)
    targets = jnp.full((4,), 3, jnp.int32)
    negatives = Negatives(jnp.full((5,), 3, jnp.int32), jnp.zeros(5), jnp.zeros(4), jnp.zeros(4))
    loss, grads = jax.jit(jax.value_and_grad(lambda p: head.apply(p, h, targets, jnp.ones(4, bool), negatives,
                                                                   method=head.loss)[0]))(params)
    assert float(loss) == 0.0
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and not np.any(g)


def test_sampler_probabilities_and_corrections():
    counts = np.array([0, 50, 20, 20, 9, 1, 0, 3])
    uni = Sampler(counts, 4, "uniform")
    np.testing.assert_allclose(uni.probabilities(), np.r_[0, np.full(7, 1 / 7)], atol=1e-9)
    gram = Sampler(counts, 4, "unigram", alpha=0.75)
    expected = np.r_[0, counts[1:] ** 0.75] / np.sum(counts[1:] ** 0.75)
    np.testing.assert_allclose(gram.probabilities(), expected, atol=1e-9)
    ids = jnp.asarray([1, 4, 6], jnp.int32)
    np.testing.assert_allclose(uni.log_count(ids), np.log(4 / 7), rtol=1e-5)
    np.testing.assert_allclose(gram.log_count(ids)[:2], np.log(4 * expected[[1, 4]]), rtol=1e-5)
    assert np.isfinite(gram.log_count(ids)[2])  # never drawn (count 0), but finite: masked tokens stay finite
    # Draws follow Q: counts within 5 standard deviations over 200,000 draws; padding never drawn.
    big = Sampler(counts, 200_000, "unigram")
    drawn, log_count = jax.jit(big.draw)(jax.random.PRNGKey(0))
    freq = np.bincount(np.asarray(drawn), minlength=len(counts))
    sd = np.sqrt(200_000 * expected * (1 - expected))
    assert freq[0] == 0 and freq[6] == 0
    assert np.all(np.abs(freq - 200_000 * expected) <= 5 * sd + 1e-9), (freq, 200_000 * expected)
    np.testing.assert_allclose(log_count, np.log(200_000 * expected[np.asarray(drawn)]), rtol=1e-5)


def test_sampler_smoothing_draws_never_trained_items():
    counts = np.array([0, 50, 20, 9, 0, 0])  # ids 4 and 5 never occur in training
    smooth = Sampler(counts, 100_000, "unigram", alpha=0.75, smoothing=1.0)
    expected = np.r_[0, (counts[1:] + 1.0) ** 0.75] / np.sum((counts[1:] + 1.0) ** 0.75)
    np.testing.assert_allclose(smooth.probabilities(), expected, atol=1e-9)
    drawn, log_count = jax.jit(smooth.draw)(jax.random.PRNGKey(1))
    freq = np.bincount(np.asarray(drawn), minlength=len(counts))
    assert freq[0] == 0 and freq[4] > 0 and freq[5] > 0
    sd = np.sqrt(100_000 * expected * (1 - expected))
    assert np.all(np.abs(freq - 100_000 * expected) <= 5 * sd + 1e-9), (freq, 100_000 * expected)
    np.testing.assert_allclose(log_count, np.log(100_000 * expected[np.asarray(drawn)]), rtol=1e-5)
    c = base_config()
    c.model.softmax, c.model.sampler_smoothing = "sampled", 1.0
    np.testing.assert_allclose(Sampler.from_config(c, counts).probabilities(), expected, atol=1e-9)


def test_negatives_depend_on_the_step_only_and_are_shared_by_micro_batches():
    model = _model("sampled")
    batch = jnp.concatenate([_batch(3), _batch(4)])  # 12 rows
    params = model.init(jax.random.PRNGKey(0), batch[:, :-1])["params"]
    sampler = Sampler(np.r_[0, np.arange(V - 1, 0, -1)], 16, "unigram")
    rng = jax.random.fold_in(jax.random.PRNGKey(5), 17)  # the key of step 17, as the train step makes it
    one = jax.jit(make_batch_grads(model, 1, sampler=sampler))(params, batch, rng)
    again = jax.jit(make_batch_grads(model, 1, sampler=sampler))(params, batch, rng)
    four = jax.jit(make_batch_grads(model, 4, sampler=sampler))(params, batch, rng)
    other = jax.jit(make_batch_grads(model, 1, sampler=sampler))(params, batch, jax.random.fold_in(rng, 1))
    assert float(one[0]) == float(again[0])
    np.testing.assert_allclose(four[0], one[0], rtol=1e-5)  # the same negatives in every micro-batch
    for g, r in zip(jax.tree.leaves(four[2]), jax.tree.leaves(one[2])):  # float32 sums in another order: 1e-5
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    assert float(other[0]) != float(one[0])


@pytest.mark.parametrize("override, message", [
    (dict(num_negatives=0), "model.num_negatives=0"),
    (dict(sampler="zipf"), "model.sampler='zipf'"),
    (dict(sampler_alpha=-1.0), "model.sampler_alpha=-1.0"),
    (dict(sampler_smoothing=-1.0), "model.sampler_smoothing=-1.0"),
    (dict(num_negatives=8, optim_sparse=True), "optim.sparse_tables=True"),
])
def test_config_errors(override, message):
    c = base_config()
    c.model.softmax = "sampled"
    for key, value in override.items():
        if key == "optim_sparse":  # lazy Adam over a compressed table is refused
            c.model.embedding, c.model.rank, c.optim.sparse_tables = "lowrank", 2, value
        else:
            c.model[key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate_config(c)
