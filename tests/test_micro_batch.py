"""Gradient accumulation over micro-batches: the same step as the whole batch, and the size rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.train.batching import WindowBatcher
from cprec.config import base_config
from cprec.data import load_dataset
from cprec.errors import ConfigError
from cprec.model.builder import build_model, init_params
from cprec.train.micro_batch import micro_batch_rows, num_micro_batches
from cprec.train import make_optimizer, make_train_step, new_train_state


@pytest.mark.parametrize("layers", [{}, pytest.param({"embedding": "blockwise", "softmax": "tree", "cutoffs": (20, 40)},
                                                     marks=pytest.mark.slow)])
def test_micro_batched_step_equals_the_whole_batch_step(tiny, layers):
    config = tiny(**layers)
    config.optim.name, config.optim.lr, config.optim.clip_norm = "sgd", 1.0, 0.0  # params - grads
    data = load_dataset(config.data, verbose=False)
    model = build_model(config, data.item_counts)
    tx = make_optimizer(config, 10)
    params = init_params(model, 0)
    batch = jnp.asarray(WindowBatcher(data.train, config.train.batch_size, 0).batch(0))
    results = []
    for micro in (1, 4, 16):
        state = new_train_state(params, tx)
        state, metrics = make_train_step(model, tx, 0, micro)(jax.tree.map(jnp.copy, state), batch)
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    (p1, m1) = results[0]
    assert m1["tokens"] > 0
    for p, m in results[1:]:
        assert m["tokens"] == m1["tokens"]
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, p1)


def _config(dim, batch=256, max_len=50, micro=0):
    c = base_config()
    c.model.dim, c.train.batch_size, c.data.max_len, c.train.micro_batch_size = dim, batch, max_len, micro
    return c


def test_automatic_micro_batches():
    # Cache-sized on CPU (the sizes that ran fastest in cprec.bench.nextitnet), whole on accelerators.
    assert micro_batch_rows(_config(64), 1, "cpu") == 64
    assert micro_batch_rows(_config(256), 1, "cpu") == 32
    assert micro_batch_rows(_config(64, batch=48), 1, "cpu") == 48  # already small: no split
    assert micro_batch_rows(_config(64, batch=96), 1, "cpu") == 48  # largest divisor under the target
    assert micro_batch_rows(_config(64), 4, "cpu") == 64
    assert num_micro_batches(_config(64), 1, "cpu") == 4
    assert micro_batch_rows(_config(64), 1, "gpu") == 256
    assert num_micro_batches(_config(64), 2, "gpu") == 1
    assert micro_batch_rows(_config(64, micro=16), 1, "gpu") == 16


def test_automatic_micro_batches_keep_full_softmax_logits_in_budget():
    # 50 positions x 1M columns x 4 bytes x 2 (logits and gradient) = 400 MB per row.
    assert micro_batch_rows(_config(64), 1, "cpu", num_items=1_000_001) == 2
    assert micro_batch_rows(_config(64), 1, "gpu", num_items=1_000_001) == 16
    assert micro_batch_rows(_config(64), 1, "cpu", num_items=30_001) == 64  # small V: the cache rule
    assert micro_batch_rows(_config(64), 1, "cpu", num_items=50_000_001) == 1  # never below one row
    tree = _config(64)
    tree.model.softmax = "tree"  # its logits are the head's and a capacity's, not V's
    assert micro_batch_rows(tree, 1, "gpu", num_items=1_000_001) == 256
    assert micro_batch_rows(_config(64, micro=32), 1, "cpu", num_items=1_000_001) == 32  # explicit wins


def test_micro_batch_size_must_divide_the_device_batch():
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=48 does not divide the 128 rows .* 2 device"):
        micro_batch_rows(_config(64, micro=48), 2, "cpu")
