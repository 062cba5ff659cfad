"""The optimizer-share benchmark's pieces: frozen-table gradients and the timing rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.bench.optimizer import bench_model, is_input_table, zipf_windows
from cprec.bench.tree_softmax import zipf_counts
from cprec.model.builder import build_model, init_params
from cprec.model.param_groups import param_path
from cprec.train.step import make_batch_grads
from tests.helpers import tiny_config

TREE = dict(embedding="blockwise", softmax="tree", cutoffs=(20, 40), ranks=(8, 4, 2))


@pytest.mark.slow
def test_frozen_tables_get_no_gradient_and_the_rest_the_same(tmp_path):
    counts = zipf_counts(61, 1.0)
    model = build_model(tiny_config(tmp_path, **TREE), counts)
    params = init_params(model, 0)
    batch = zipf_windows(counts, 8, 11, 0)
    rng = jax.random.PRNGKey(0)
    total, count, full = make_batch_grads(model, 2)(params, batch, rng)
    total_f, count_f, part = make_batch_grads(model, 2, is_input_table)(params, batch, rng)
    np.testing.assert_allclose(total_f, total, rtol=1e-6)
    assert count_f == count == 80
    for (path, g), g_f in zip(jax.tree_util.tree_flatten_with_path(full)[0], jax.tree.leaves(part)):
        if is_input_table(param_path(path)):
            assert float(jnp.abs(g).max()) > 0 and float(jnp.abs(g_f).max()) == 0, param_path(path)
        else:
            np.testing.assert_allclose(g_f, g, rtol=1e-5, atol=1e-7, err_msg=param_path(path))


@pytest.mark.slow  # compiles and times four programs; the gradients it times are checked above
def test_bench_rows_have_every_timing_and_shares(tmp_path):
    config = tiny_config(tmp_path, **TREE)
    row = bench_model(config, zipf_counts(61, 1.0), repeats=1)
    for key in ("step_s", "grads_s", "grads_frozen_tables_s", "update_s"):
        assert row[key] > 0, key
    assert 0 < row["update_share"] and 0 <= row["table_grad_share"]
    assert 0 < row["input_table_params"] < row["params"] and row["batch_size"] == 16
    assert is_input_table("embed/tail_1_emb") and not is_input_table("head/tail_1_out")
    assert not is_input_table("embed/tail_1_proj")
