"""Incremental encoding (cprec.serve.incremental) against NextItNet.encode of a long left-padded window."""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.model import NextItNet
from cprec.serve import incremental as inc

TOL = dict(rtol=1e-5, atol=1e-5)
DILATIONS = (1, 2, 1, 4)  # convs (1,2) (2,4) (1,2) (4,8): receptive field 1 + 2 * 24 = 49
# Rows of different lengths in one batch: empty, short, and longer than the receptive field.
LENGTHS = (0, 1, 3, 17, 60)


def make_model(sharing="none", embedding="full"):
    if embedding == "blockwise":
        return NextItNet(num_items=40, dim=8, dilations=DILATIONS, sharing=sharing, embedding="blockwise",
                         cutoffs=(10, 25, 40), ranks=(8, 4, 2))
    return NextItNet(num_items=40, dim=8, dilations=DILATIONS, sharing=sharing)


def perturbed_params(model, seed=0):
    """Init params with every leaf scaled and shifted by noise: conv and LN biases become non-zero,
    so the padding activations are far from zero and a wrong initial state shows."""
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), 2 * len(leaves))
    noise = [jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves + leaves)]
    new = [leaf * (1 + 0.5 * noise[i]) + 0.2 * noise[len(leaves) + i] for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(tree, new)


def histories(lengths, t, seed=0, num_items=40):
    """[B, t] left-padded with 0: row b's last lengths[b] entries are items in 1..num_items-1."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(lengths), t), np.int32)
    for b, n in enumerate(lengths):
        if n:
            out[b, t - n:] = rng.integers(1, num_items, n)
    return out


@functools.cache
def jitted(model):
    """append and append_many jitted once per model: eager, the per-step loop dispatches hundreds of
    small ops per event, and an eager scan re-traces and recompiles on every call."""
    return types.SimpleNamespace(append=jax.jit(functools.partial(inc.append, model)),
                                 append_many=jax.jit(functools.partial(inc.append_many, model)))


def reference_h(model, params, hist):
    """encode of the history with receptive_field extra zeros on the left, last position."""
    pad = np.zeros((hist.shape[0], inc.receptive_field(model)), np.int32)
    window = np.concatenate([pad, hist], axis=1)
    return np.asarray(model.apply({"params": params}, window, method=NextItNet.encode)[:, -1])


def assert_states_close(a, b):
    assert len(a["queues"]) == len(b["queues"])
    for qa, qb in zip(a["queues"], b["queues"]):
        np.testing.assert_allclose(qa, qb, **TOL)
    np.testing.assert_array_equal(a["count"], b["count"])
    np.testing.assert_allclose(a["h"], b["h"], **TOL)


# Every sharing scheme and both embeddings (they do not interact: the embedding goes through the model,
# sharing only picks kernels), kept to four models for the run time; the two without sharing run with -m slow.
CASES = [pytest.param(("none", "full"), marks=pytest.mark.slow), pytest.param(("none", "blockwise"), marks=pytest.mark.slow),
         ("cross_block", "full"), ("adjacent_block", "blockwise")]


@pytest.fixture(scope="module", params=CASES, ids=["none-full", "none-blockwise", "cross_block-full", "adjacent_block-blockwise"])
def setup(request):
    model = make_model(*request.param)
    params = perturbed_params(model)
    return model, params, inc.padding_row(model, params)


@pytest.mark.slow
def test_receptive_field_is_exact():
    model = make_model()
    params = perturbed_params(model)
    rf = inc.receptive_field(model)
    assert rf == 49
    assert inc.receptive_field(NextItNet(num_items=40, dim=8, dilations=(1, 4) * 5)) == 151
    # Changing the item rf-1 steps back moves the last hidden state; rf steps back does not.
    base = histories([rf + 5], rf + 5, seed=3)
    h0 = model.apply({"params": params}, base, method=NextItNet.encode)[:, -1]
    for back, moves in ((rf - 1, True), (rf, False)):
        x = base.copy()
        x[0, -1 - back] = x[0, -1 - back] % 39 + 1
        h = model.apply({"params": params}, x, method=NextItNet.encode)[:, -1]
        assert bool(jnp.any(jnp.abs(h - h0) > 1e-4)) == moves


def test_window_pass_is_the_stack(setup):
    # With zero prefixes the module's own window pass is ResidualStack exactly (same parameters).
    model, params, _ = setup
    hist = histories((5, 12), 12, seed=4)
    x = inc._embed(model, params, hist)
    out, _ = inc._window(model, params, x, None)
    np.testing.assert_allclose(out, model.apply({"params": params}, hist, method=NextItNet.encode), **TOL)


@pytest.mark.parametrize("suffix", [1, 4, 13, 30])
def test_encoding_a_suffix_equals_encode_of_the_whole_window(setup, suffix):
    """A window of 30 whose histories fit in its last `suffix` positions: those positions, encoded
    alone with the padding window's activations as their left context, equal encode's."""
    model, params, _ = setup
    t = 30
    hist = histories((0, 1, min(3, suffix), suffix), t, seed=5)
    want = np.asarray(model.apply({"params": params}, hist, method=NextItNet.encode))[:, t - suffix:]
    prefixes = inc.window_prefixes(model, inc.padding_window(model, params, t), suffix)
    got = inc.encode_suffix(model, params, jnp.asarray(hist[:, t - suffix:]), prefixes)
    np.testing.assert_allclose(got, want, **TOL)
    with pytest.raises(ValueError, match="longer than the padding window"):
        inc.window_prefixes(model, inc.padding_window(model, params, t), t + 1)


@pytest.mark.slow
def test_append_matches_encode_of_a_long_padded_window(setup):
    model, params, row = setup
    hist = histories(LENGTHS, max(LENGTHS), seed=0)
    want = reference_h(model, params, hist)
    state0 = inc.initial_state(model, params, len(LENGTHS), row)
    # One event at a time (the serving path), masking the rows' left padding.
    state, mask = state0, hist > 0
    for t in range(hist.shape[1]):
        state, h = jitted(model).append(params, state, hist[:, t], mask[:, t])
    np.testing.assert_allclose(h, want, **TOL)
    # The scan (here with lengths; a mask below) and the whole-window pass agree, state included.
    by_lengths, h_l = jitted(model).append_many(params, state0, hist, lengths=np.array(LENGTHS))
    whole, h_w = inc.encode_state(model, params, hist, row)
    for h_x in (h_l, h_w):
        np.testing.assert_allclose(h_x, want, **TOL)
    for s in (by_lengths, whole):
        assert_states_close(s, state)


@pytest.mark.slow
def test_appending_more_equals_recomputing_the_whole_history(setup):
    model, params, row = setup
    first_lengths, more_lengths = (0, 2, 30, 9, 55), (4, 0, 25, 1, 12)
    # b has the shape of the previous test's history, so the jitted scan is reused.
    a = histories(first_lengths, 55, seed=1)
    b = histories(more_lengths, max(LENGTHS), seed=2)
    both = np.zeros((5, 80), np.int32)
    for r, (n1, n2) in enumerate(zip(first_lengths, more_lengths)):
        seq = np.concatenate([a[r, 55 - n1:], b[r, b.shape[1] - n2:]])
        if len(seq):
            both[r, 80 - len(seq):] = seq
    state, _ = inc.encode_state(model, params, a, row)
    state, h = jitted(model).append_many(params, state, b, lengths=np.array(more_lengths))
    full, h_full = inc.encode_state(model, params, both, row)
    assert_states_close(state, full)
    np.testing.assert_allclose(h, h_full, **TOL)
    np.testing.assert_allclose(h, reference_h(model, params, both), **TOL)


def test_masked_steps_leave_the_state_unchanged(setup):
    model, params, row = setup
    state, _ = inc.encode_state(model, params, histories((3, 7, 0, 1, 5), 7, seed=5), row)
    mask = np.array([False, True, False, True, True])
    new, h = jitted(model).append(params, state, jnp.array([5, 6, 7, 8, 9], jnp.int32), mask)
    for qa, qb in zip(new["queues"], state["queues"]):
        np.testing.assert_array_equal(qa[~mask], qb[~mask])
        assert not np.array_equal(qa[mask], qb[mask])
    np.testing.assert_array_equal(new["count"], state["count"] + mask)
    np.testing.assert_array_equal(h[~mask], state["h"][~mask])


@pytest.mark.slow
def test_padding_state_is_not_zero_and_matters():
    model = make_model("none", "blockwise")
    params = perturbed_params(model)
    row = inc.padding_row(model, params)
    for q in row["queues"]:
        assert float(jnp.abs(q).max()) > 1e-2
        # Endless padding: every slot of a queue holds the same vector.
        np.testing.assert_allclose(q, jnp.broadcast_to(q[:, :1], q.shape), **TOL)
    # A history shorter than the receptive field: a zero initial state gives a different answer.
    hist = histories((1, 5, 20), 20, seed=6)
    want = reference_h(model, params, hist)
    zero = jax.tree.map(jnp.zeros_like, inc.initial_state(model, params, 3, row))
    _, h_zero = jitted(model).append_many(params, zero, hist, mask=hist > 0)
    assert float(jnp.abs(h_zero - want).max()) > 1e-2
    _, h = jitted(model).append_many(params, inc.initial_state(model, params, 3, row), hist, mask=hist > 0)
    np.testing.assert_allclose(h, want, **TOL)
    # And encode of a window too short for its zero padding to be forgotten differs as well: the
    # reference needs the extra receptive_field of padding.
    short = model.apply({"params": params}, hist, method=NextItNet.encode)[:, -1]
    assert float(jnp.abs(short - want).max()) > 1e-2


def test_append_jits_once_per_batch_size():
    model = make_model("adjacent_block", "full")
    params = perturbed_params(model)
    fn = jax.jit(functools.partial(inc.append, model))
    state = inc.initial_state(model, params, 3)
    hist = histories((3, 8, 8), 8, seed=7)
    for t in range(hist.shape[1]):
        state, h = fn(params, state, hist[:, t], hist[:, t] > 0)
    assert fn._cache_size() == 1
    # Eager and without a mask (every row takes the event) it is the same function.
    items = jnp.array([3, 4, 5], jnp.int32)
    eager = inc.append(model, params, state, items)[1]
    np.testing.assert_allclose(eager, fn(params, state, items, items > 0)[1], **TOL)
    np.testing.assert_allclose(h, reference_h(model, params, hist), **TOL)
    # Per row: C floats per queue slot, plus the int32 count and the C floats of h.
    slots = inc.receptive_field(model) - 1
    assert inc.state_nbytes(state) == 3 * (slots * 8 * 4 + 4 + 8 * 4)
