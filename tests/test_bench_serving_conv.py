"""cprec.bench.serving_conv on a tiny export: both convs are timed and give the same top-20s."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.bench.serving_conv import main
from cprec.model.nextitnet import NextItNet
from cprec.serve.artifact import model_kwargs_of, save_artifact

V = 40


@pytest.mark.slow  # kept out of CI: another test covers this path faster (run with -m slow)
def test_conv_ab_reports_both_convs_and_identical_answers(tmp_path):
    model = NextItNet(num_items=V, dim=8, dilations=(1, 2, 4), embedding="blockwise", softmax="tree",
                      cutoffs=(10, 25, V), ranks=(8, 4, 2), sharing="cross_block")
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32))["params"]
    params = jax.tree.map(lambda x: np.asarray(x) * 3 + 0.1, params)  # scores spread past ties
    art = save_artifact(tmp_path / "art", model_kwargs=model_kwargs_of(model), max_len=12, params=params,
                        item_ids=[None] + list(range(1, V)), item_counts=np.arange(V)[::-1].copy(),
                        dtype="float32", manifest={})
    out = tmp_path / "ab.json"
    res = main([str(art), "--history", "5,12", "--batches", "1,4", "--rounds", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["history"], r["batch"]) for r in rows] == [(5, 1), (5, 4), (12, 1), (12, 4)] == \
        [(r["history"], r["batch"]) for r in res["rows"]]
    for r in rows:
        assert r["same_top20"] == r["batch"] and r["matmul_ms"] > 0 and r["xla_ms"] > 0
        assert len(r["per_round"]) == 2
