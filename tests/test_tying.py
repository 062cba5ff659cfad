"""Tied item tables (full and CpRec), the output projection, and weight decay by parameter group."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cprec.config import validate_config, with_defaults
from cprec.errors import ConfigError
from cprec.model.builder import build_model, count_params, init_params, param_report, uncompressed_config
from cprec.model.tables.blockwise import blockwise_param_count
from cprec.model.nextitnet import NextItNet
from cprec.model.param_groups import decay_group, param_path
from cprec.train.step import make_optimizer
from tests.helpers import tiny_config

COUNTS = np.concatenate([[0], np.arange(60, 0, -1)])  # 60 frequency-ordered items + padding
V, D = 61, 8
CUTS, RANKS = (20, 40, 61), (8, 4, 2)
TREE = dict(embedding="blockwise", softmax="tree", cutoffs=(20, 40), ranks=RANKS)
X = jnp.asarray(np.random.default_rng(0).integers(0, V, size=(4, 10)), jnp.int32)
Y = jnp.asarray(np.random.default_rng(1).integers(1, V, size=(4, 10)), jnp.int32)


def _model(tmp_path, **kw):
    return build_model(tiny_config(tmp_path, **kw), COUNTS)


def _stack_params(tmp_path) -> int:
    return count_params(init_params(_model(tmp_path), 0)["stack"])


@pytest.mark.parametrize("projection", [False, True])
def test_tied_full_model_counts_the_table_once(tmp_path, projection):
    model = _model(tmp_path, tie_embeddings=True, output_projection=projection)
    params = init_params(model, 0)
    proj = (D * D + D) if projection else 0
    assert count_params(params) == V * D + _stack_params(tmp_path) + proj
    assert ("head" in params) == projection and "kernel" not in params.get("head", {})
    report = param_report(model, build_model(uncompressed_config(tiny_config(tmp_path, tie_embeddings=True)), COUNTS))
    assert report["params/total"] == count_params(params) and report["params/embedding"] == V * D
    assert report["params/output"] == proj


@pytest.mark.parametrize("tie_projections", [False, True])
@pytest.mark.parametrize("projection", [False, True])
def test_tied_cprec_parameter_count_matches_the_formula(tmp_path, tie_projections, projection):
    model = _model(tmp_path, **TREE, tie_embeddings=True, tie_projections=tie_projections,
                   output_projection=projection)
    params = init_params(model, 0)
    tail = len(CUTS) - 1
    output = D * tail + (0 if tie_projections else sum(D * d for d in RANKS[1:])) + (D * D + D if projection else 0)
    assert count_params(params["embed"]) == blockwise_param_count(CUTS, RANKS, D)
    assert count_params(params["head"]) == output
    assert set(params["head"]) >= {"tokens"} and not any(k.endswith("_out") for k in params["head"])
    untied = init_params(_model(tmp_path, **TREE), 0)
    sizes = [b - a for a, b in zip(CUTS, CUTS[1:])]
    assert count_params(untied["head"]) == D * (CUTS[0] + tail) + sum(D * d + d * k for d, k in zip(RANKS[1:], sizes))


def _untied_copy(kw, tied_params):
    """Untied parameters that compute exactly what the tied ones do (each shared table copied)."""
    p = jax.tree.map(lambda x: x, tied_params)
    if kw.get("softmax") == "tree":
        head = dict(p["head"])
        tokens = head.pop("tokens")
        head["head"] = jnp.concatenate([p["embed"]["head"].T, tokens], axis=1)
        for j in (1, 2):
            head[f"tail_{j}_out"] = p["embed"][f"tail_{j}_emb"].T
            if kw.get("tie_projections"):
                head[f"tail_{j}_proj"] = p["embed"][f"tail_{j}_proj"].T
        p["head"] = head
    else:
        p["head"] = {**p.get("head", {}), "kernel": p["embed"]["embedding"].T}
    return p


TIED_KWS = [dict(), dict(output_projection=True), dict(**TREE), dict(**TREE, tie_projections=True, output_projection=True)]


# CI: the two with the output projection (they include the others' paths); those without with -m slow.
@pytest.mark.parametrize("kw", [pytest.param(kw, marks=pytest.mark.slow) if "output_projection" not in kw else kw
                                for kw in TIED_KWS], ids=["full", "full-proj", "tree", "tree-tieproj-proj"])
def test_tied_gradient_is_the_sum_of_both_uses_and_outputs_match_untied(tmp_path, kw):
    tied_model = _model(tmp_path, **kw, tie_embeddings=True)
    untied_kw = {k: v for k, v in kw.items() if k != "tie_projections"}
    untied_model = _model(tmp_path, **untied_kw)
    tied = init_params(tied_model, 3)
    untied = _untied_copy(kw, tied)
    assert jax.tree.structure(untied) == jax.tree.structure(init_params(untied_model, 0))

    def loss(model, p):
        return model.apply({"params": p}, X, Y, method=NextItNet.loss)[0]

    np.testing.assert_allclose(loss(tied_model, tied), loss(untied_model, untied), rtol=1e-6)
    g_tied = jax.grad(lambda p: loss(tied_model, p))(tied)
    g_untied = jax.grad(lambda p: loss(untied_model, p))(untied)
    e, h = g_untied["embed"], g_untied["head"]
    if kw.get("softmax") == "tree":
        k1 = CUTS[0]
        np.testing.assert_allclose(g_tied["embed"]["head"], e["head"] + h["head"][:, :k1].T, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g_tied["head"]["tokens"], h["head"][:, k1:], rtol=1e-5, atol=1e-7)
        for j in (1, 2):
            np.testing.assert_allclose(g_tied["embed"][f"tail_{j}_emb"], e[f"tail_{j}_emb"] + h[f"tail_{j}_out"].T,
                                       rtol=1e-5, atol=1e-7)
            if kw.get("tie_projections"):
                np.testing.assert_allclose(g_tied["embed"][f"tail_{j}_proj"],
                                           e[f"tail_{j}_proj"] + h[f"tail_{j}_proj"].T, rtol=1e-5, atol=1e-7)
        # the tied tables really do get gradient from both uses
        assert float(jnp.abs(h["tail_1_out"]).sum()) > 0 and float(jnp.abs(e["tail_1_emb"]).sum()) > 0
    else:
        np.testing.assert_allclose(g_tied["embed"]["embedding"], e["embedding"] + h["kernel"].T, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_tied["stack"]["kernels"], g_untied["stack"]["kernels"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw", TIED_KWS, ids=["full", "full-proj", "tree", "tree-tieproj-proj"])
def test_tied_log_prob_sums_to_one_and_top_k_is_exact(tmp_path, kw):
    model = _model(tmp_path, **kw, tie_embeddings=True)
    params = init_params(model, 1)
    lp = model.apply({"params": params}, X, method=NextItNet.last_log_prob)
    np.testing.assert_allclose(jnp.exp(lp).sum(axis=1), 1.0, rtol=1e-5)
    scores, ids, _ = model.apply({"params": params}, X, 7, method=NextItNet.top_k)
    ref_scores, ref_ids = jax.lax.top_k(lp[:, 1:], 7)
    np.testing.assert_array_equal(ids, ref_ids + 1)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_kw", [dict(tie_embeddings=True, embedding="lowrank", rank=2, softmax="tree", cutoffs=(20,)),
                                      dict(tie_embeddings=True, softmax="tree", cutoffs=(20,))])
def test_impossible_tying_is_a_config_error(tmp_path, model_kw):
    with pytest.raises(ConfigError, match="tie_embeddings"):
        validate_config(tiny_config(tmp_path, **model_kw))


@pytest.mark.parametrize("model_kw", [dict(tie_projections=True, **TREE), dict(tie_projections=True, tie_embeddings=True)])
def test_tie_projections_has_no_effect_without_tied_cprec(tmp_path, model_kw):
    validate_config(tiny_config(tmp_path, **model_kw))
    model = _model(tmp_path, **model_kw)
    assert model.tie_projections is False
    plain = {k: v for k, v in model_kw.items() if k != "tie_projections"}
    assert count_params(init_params(model, 0)) == count_params(init_params(_model(tmp_path, **plain), 0))


def test_decay_groups_name_tables_dense_weights_and_the_undecayed():
    assert decay_group("embed/embedding") == decay_group("head/tail_3_out") == decay_group("head/tokens") == "table"
    assert decay_group("stack/kernels") == decay_group("head/proj/kernel") == decay_group("head/tail_1_proj") == "dense"
    assert decay_group("stack/ln_0_1/scale") == decay_group("stack/biases") == decay_group("head/proj/bias") == "none"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_weight_decay_moves_exactly_its_group(tmp_path, name):
    config = tiny_config(tmp_path, **TREE, tie_embeddings=True, output_projection=True)
    params = init_params(build_model(config, COUNTS), 0)
    params = jax.tree.map(lambda x: x + 0.5, params)  # biases and LN offsets are zero-initialised
    zero = jax.tree.map(jnp.zeros_like, params)
    moved = {}
    for dense, table in ((0.1, 0.0), (0.0, 0.1)):
        config.optim.name, config.optim.weight_decay, config.optim.table_weight_decay = name, dense, table
        tx = make_optimizer(config, 10)
        updates, _ = tx.update(zero, tx.init(params), params)
        flat = jax.tree_util.tree_flatten_with_path(updates)[0]
        moved[(dense, table)] = {param_path(p) for p, u in flat if float(jnp.abs(u).max()) > 0}
    names = {param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert moved[(0.1, 0.0)] == {n for n in names if decay_group(n) == "dense"} != set()
    assert moved[(0.0, 0.1)] == {n for n in names if decay_group(n) == "table"} != set()


def test_adam_without_decay_keeps_its_optimizer_state(tmp_path):
    """Checkpoints of runs from before weight decay by group still resume."""
    config = tiny_config(tmp_path)
    params = init_params(build_model(config, COUNTS), 0)
    state = make_optimizer(config, 10).init(params)
    assert jax.tree.structure(state) == jax.tree.structure(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)).init(params))


def test_configs_stored_before_tying_existed_get_its_defaults(tmp_path):
    stored = tiny_config(tmp_path).to_dict()
    for key in ("tie_embeddings", "tie_projections", "output_projection"):
        del stored["model"][key]
    del stored["optim"]["table_weight_decay"]
    filled = with_defaults(stored)
    assert filled["model"]["tie_embeddings"] is False and filled["optim"]["table_weight_decay"] == 0.0
    assert filled["model"]["dim"] == D and filled["data"]["num_items"] == 60
