"""The row-sparse (lazy Adam) step of optim.sparse_tables against dense Adam."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.config import base_config, validate_config
from cprec.errors import ConfigError
from cprec.model.builder import build_model, init_params
from cprec.train.sampling import Sampler
from cprec.train.sparse_tables import make_sparse_train_step, new_sparse_state
from cprec.train.step import learning_rate, make_optimizer, make_train_step, new_train_state, sampling_key

V = 10  # ids 0..9, 0 = padding


def _config(tied: bool, backbone: str = "nextitnet", **optim):
    c = base_config()
    c.model.dim, c.model.dilations, c.model.num_blocks = 8, (1, 2), 1
    c.model.softmax, c.model.num_negatives, c.model.sampler = "sampled", 6, "uniform"
    c.model.tie_embeddings = c.model.output_projection = tied
    if backbone == "sasrec":  # tied without a projection: logits = h E^T, no output module at all
        c.model.backbone, c.model.inner_dim, c.model.output_projection = "sasrec", 16, False
    c.optim.sparse_tables, c.optim.lr = True, 1e-2
    c.optim.update(optim)
    validate_config(c)
    return c


def _steps(config, counts, batches, sparse: bool):
    model = build_model(config, counts)
    params = init_params(model, 0)
    sampler = Sampler.from_config(config, counts)
    if sparse:
        dense_tx = make_optimizer(config, 100, clip=False)
        lr = learning_rate(config, 100)
        state = new_sparse_state(params, dense_tx)
        step = make_sparse_train_step(model, config, dense_tx, lr if callable(lr) else (lambda c: lr), sampler)
    else:
        tx = make_optimizer(config, 100)
        state, step = new_train_state(params, tx), make_train_step(model, tx, config.seed, 1, sampler)
    losses = []
    for batch in batches:
        state, metrics = step(state, jnp.asarray(batch, jnp.int32))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("tied, backbone", [(False, "nextitnet"), pytest.param(True, "nextitnet", marks=pytest.mark.slow),
                                            (True, "sasrec")])
@pytest.mark.parametrize("schedule", ["constant", pytest.param("cosine", marks=pytest.mark.slow)])
def test_rows_touched_at_every_step_follow_dense_adam(tied, backbone, schedule):
    # Every id is an input and a target of every batch (padding included), so every row of both
    # tables has a gradient at every step: lazy and dense Adam must agree on every parameter.
    config = _config(tied, backbone, schedule=schedule, warmup_steps=2, clip_norm=0.5)
    counts = np.r_[0, np.arange(V - 1, 0, -1)]
    row = np.r_[0, 0, np.arange(1, V)]
    batches = [np.stack([np.roll(row, 0), np.r_[0, 0, np.arange(V - 1, 0, -1)], np.r_[0, 0, 0, np.arange(1, V - 1)],
                         np.r_[0, 0, np.random.default_rng(s).permutation(np.arange(1, V))]]) for s in range(4)]
    dense, dense_losses = _steps(config, counts, batches, sparse=False)
    sparse, sparse_losses = _steps(config, counts, batches, sparse=True)
    np.testing.assert_allclose(sparse_losses, dense_losses, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sparse["params"])[0], jax.tree.leaves(dense["params"])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("tied", [False, True])
def test_untouched_rows_keep_their_values_and_moments(tied):
    config = _config(tied)
    num_items = 40
    counts = np.r_[0, np.arange(num_items - 1, 0, -1)]
    rng = np.random.default_rng(0)
    batches = [np.c_[np.zeros((4, 2), int), rng.integers(1, 9, size=(4, 6))] for _ in range(3)]  # ids 1..8 only
    model = build_model(config, counts)
    start = init_params(model, 0)
    state, _ = _steps(config, counts, batches, sparse=True)
    sampler = Sampler.from_config(config, counts)
    drawn = set()
    for step in range(3):
        ids, _ = sampler.draw(sampling_key(jax.random.fold_in(jax.random.PRNGKey(config.seed), step)))
        drawn |= set(np.asarray(ids).tolist())
    inputs = set(range(0, 9))
    outputs = inputs | drawn
    touched = {"embed/embedding": outputs if tied else inputs}
    if not tied:
        touched["head/kernel"] = outputs
    for name, rows in touched.items():
        path = tuple(name.split("/"))
        axis = 0 if name == "embed/embedding" else 1
        untouched = np.array(sorted(set(range(num_items)) - rows))
        assert len(untouched) > 5
        before, after = (np.take(np.asarray(t[path[0]][path[1]]), untouched, axis=axis) for t in (start, state["params"]))
        np.testing.assert_array_equal(after, before)
        for moment in ("mu", "nu"):
            np.testing.assert_array_equal(np.take(np.asarray(state["opt_state"]["tables"][name][moment]), untouched,
                                                  axis=axis), 0.0)
        touched_rows = np.array(sorted(rows))
        assert not np.allclose(np.take(np.asarray(state["params"][path[0]][path[1]]), touched_rows, axis=axis),
                               np.take(np.asarray(start[path[0]][path[1]]), touched_rows, axis=axis))


@pytest.mark.parametrize("override, message", [
    (dict(softmax="full"), "needs model.softmax=sampled"),
    (dict(name="adamw"), "needs optim.name=adam"),
    (dict(table_weight_decay=1e-4), "optim.table_weight_decay=0"),
])
def test_config_errors(override, message):
    c = base_config()
    c.model.softmax = "sampled"
    c.optim.sparse_tables = True
    for key, value in override.items():
        (c.model if key == "softmax" else c.optim)[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(c)
