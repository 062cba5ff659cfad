"""Magnitude pruning (model.embedding='prune'): the schedule, the pruner inside the train step, the
budget in non-zeros, and the sparse artifact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.model.builder import budget_choice, build_model, init_params, param_report, uncompressed_config
from cprec.serve import sparse
from cprec.train import make_optimizer, make_train_step, new_train_state
from cprec.train.pruning import make_pruner, prune_smallest, sparsity_at
from tests.helpers import tiny_config

COUNTS = np.concatenate([[0], np.arange(60, 0, -1)])


def test_the_schedule_rises_cubically_from_begin_to_end_and_stays_at_the_target():
    s = lambda step: float(sparsity_at(jnp.asarray(step), 100, 0.9, 0.1, 0.6))
    assert s(0) == s(10) == 0.0
    assert s(35) == pytest.approx(0.9 * (1 - 0.5**3))  # halfway: 7/8 of the target
    assert s(60) == s(100) == pytest.approx(0.9)
    steps = [s(t) for t in range(0, 101)]
    assert steps == sorted(steps)


def test_prune_smallest_zeroes_exactly_the_smallest_magnitudes():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)), jnp.float32)
    out = np.asarray(prune_smallest(table, jnp.asarray(0.4)))
    order = np.argsort(np.abs(np.asarray(table)).ravel())
    assert (out.ravel()[order[:14]] == 0).all() and (out.ravel()[order[14:]] != 0).all()


def test_the_step_reaches_the_target_and_pruned_entries_never_come_back(tmp_path):
    config = tiny_config(tmp_path, embedding="prune", prune_sparsity=0.75, tie_embeddings=True,
                         prune_begin=0.0, prune_end=0.5, prune_every=2)
    model = build_model(config, COUNTS)
    tx = make_optimizer(config, 12)
    pruner = make_pruner(config, 12)
    state = new_train_state(init_params(model, 0), tx)
    step = make_train_step(model, tx, 0, pruner=pruner)
    batch = jnp.asarray(np.random.default_rng(1).integers(1, 61, size=(16, 11)), jnp.int32)
    zeros_before = None
    for t in range(1, 13):
        state, _ = step(state, batch)
        table = np.asarray(state["params"]["embed"]["embedding"])
        zeros = table == 0
        want = round(float(sparsity_at(jnp.asarray(t), 12, 0.75, 0.0, 0.5)) * table.size) if t % 2 == 0 or t == 6 else None
        if want is not None and t <= 6:
            assert zeros.sum() == want, (t, zeros.sum(), want)
        if zeros_before is not None:
            assert not (zeros_before & ~zeros).any(), f"a pruned entry came back at step {t}"
        zeros_before = zeros
    assert zeros.mean() == pytest.approx(0.75, abs=1 / table.size)
    # The property is not trivial: Adam's moments would move a pruned entry if the step let them.
    plain = make_train_step(model, tx, 0)
    moved, _ = plain(jax.tree.map(jnp.copy, state), batch)
    assert (np.asarray(moved["params"]["embed"]["embedding"])[zeros] != 0).any()


def test_the_budget_counts_non_zeros(tmp_path):
    config = tiny_config(tmp_path, embedding="prune", budget="2x", tie_embeddings=True, budget_baseline="untied")
    choice = budget_choice(config, COUNTS)
    model = build_model(config, COUNTS)
    report = param_report(model, build_model(uncompressed_config(config), COUNTS))
    assert report["params/total"] == choice.params and 0.9 * choice.target <= choice.params <= choice.target
    assert report["params/pruned"] == round(dict(model.table_options)["prune_sparsity"] * 61 * 8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("axis", [0, 1])
def test_the_sparse_layout_round_trips_and_is_as_small_as_its_non_zeros(dtype, axis):
    rng = np.random.default_rng(2)
    table = rng.normal(size=(300, 64)).astype(np.float32)
    table[rng.random(table.shape) < 0.9] = 0.0
    table[5] = 0.0  # an empty slice
    table = table if axis == 0 else table.T
    parts = sparse.encode(table, axis, dtype)
    nnz = np.count_nonzero(table)
    value_bytes = {"float32": 4, "bfloat16": 2, "int8": 1}[dtype]
    want = nnz * (value_bytes + 1) + 301 * 4 + (300 * 8 if dtype == "int8" else 0)
    assert sparse.stored_bytes(parts) == want
    dense = np.asarray(sparse.densify(parts, table.shape, axis))
    np.testing.assert_array_equal(dense == 0, table == 0)  # zeros stay exactly zero
    if dtype == "float32":
        np.testing.assert_array_equal(dense, table)
    else:
        np.testing.assert_allclose(dense, table, atol=0.05 * np.abs(table).max())
    # inside a traced program (the StableHLO export) the same
    traced = jax.jit(lambda p: sparse.densify(p, table.shape, axis))(parts)
    np.testing.assert_array_equal(np.asarray(traced) == 0, table == 0)
    np.testing.assert_allclose(np.asarray(traced), dense, rtol=1e-6, atol=1e-6)  # int8: fused multiply-add
