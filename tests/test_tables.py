"""Item tables (cprec/model/tables/): rows against hand-indexed references, scores against the dense
product, parameter counts against each formula, the budget solvers, and tied gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.config import validate_config
from cprec.errors import ConfigError
from cprec.model import tables
from cprec.model.builder import budget_choice, build_model, count_params, init_params, table_options
from cprec.model.nextitnet import NextItNet
from cprec.model.tables import SIZED, make_table
from cprec.model.tables.base import ItemTable
from tests.helpers import tiny_config

V, D = 61, 8
IDS = jnp.asarray(np.random.default_rng(0).integers(0, V, size=(3, 7)), jnp.int32)
H = jnp.asarray(np.random.default_rng(1).normal(size=(5, D)), jnp.float32)
KINDS = {
    "full": dict(kind="full"),
    "blockwise": dict(kind="blockwise", cutoffs=(10, 30, V), ranks=(D, 4, 2)),
    "lowrank": dict(kind="lowrank", options=(("rank", 3),)),
    "hash": dict(kind="hash", options=(("hash_rows", 13),)),
    "qr-mult": dict(kind="qr", options=(("qr_buckets", 7), ("qr_op", "mult"))),
    "qr-add": dict(kind="qr", options=(("qr_buckets", 7), ("qr_op", "add"))),
    "qr-concat": dict(kind="qr", options=(("qr_buckets", 7), ("qr_op", "concat"))),
    "tt": dict(kind="tt", options=(("tt_rank", 3),)),
    # 3 sub-spaces of widths 3, 2, 3; 5 centroids: 3-bit codes, 8 to a float, one float per item
    "jpq": dict(kind="jpq", options=(("jpq_splits", 3), ("jpq_centroids", 5), ("jpq_assign", "random"))),
}


def _table(spec) -> tuple[ItemTable, dict]:
    table = make_table(spec["kind"], V, D, spec.get("cutoffs", ()), spec.get("ranks", ()), spec.get("options", ()))
    params = table.init(jax.random.PRNGKey(3), IDS)["params"]
    return table, jax.tree.map(np.asarray, params)


def _numpy_hash(ids, rows):
    x = (np.asarray(ids).astype(np.uint64) * 0x9E3779B1) % (1 << 32)
    return ((x ^ (x >> 16)) % rows).astype(np.int64)


def _reference_rows(name, p, ids):
    """Each table's vectors composed by hand in numpy."""
    ids = np.asarray(ids)
    if name == "full":
        return p["embedding"][ids]
    if name == "lowrank":
        return p["factors"][ids] @ p["proj"]
    if name == "hash":
        return p["rows"][_numpy_hash(ids, 13)]
    if name == "tt":  # V = 61 -> (4, 4, 4) item factors, dim 8 -> (2, 2, 2)
        i1, i2, i3 = ids // 16, (ids // 4) % 4, ids % 4
        rows = np.einsum("...ar,...rbs,...sc->...abc", p["core_1"][i1], p["core_2"][i2], p["core_3"][i3])
        return rows.reshape(*ids.shape, D)
    if name == "jpq":  # base-5 digits of each item's packed float, then its centroids' slices
        codes = (p["codes"][ids, 0].astype(np.int64)[..., None] // 5 ** np.arange(3)) % 5
        bounds = [(0, 3), (3, 5), (5, 8)]
        return np.concatenate([p["centroids"][codes[..., k], s:e] for k, (s, e) in enumerate(bounds)], axis=-1)
    if name == "blockwise":
        dense = np.concatenate([p["head"], p["tail_1_emb"] @ p["tail_1_proj"], p["tail_2_emb"] @ p["tail_2_proj"]])
        return dense[ids]
    q, r = p["quotient"][ids // 7], p["remainder"][ids % 7]
    return {"qr-mult": q * r, "qr-add": q + r, "qr-concat": np.concatenate([q, r], axis=-1)}[name]


@pytest.mark.parametrize("name", list(KINDS))
def test_rows_equal_the_tables_indexed_by_hand(name):
    table, params = _table(KINDS[name])
    got = table.apply({"params": params}, IDS)
    np.testing.assert_allclose(got, _reference_rows(name, params, IDS), rtol=1e-5, atol=1e-6)
    dense = table.apply({"params": params}, method="dense")
    np.testing.assert_allclose(dense, _reference_rows(name, params, np.arange(V)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("block", [7, 4096])
def test_blocked_scores_equal_the_dense_product(name, block, monkeypatch):
    monkeypatch.setattr(tables.base, "SCORE_BLOCK", block)  # 7: several blocks, the last one padded
    table, params = _table(KINDS[name])
    got = table.apply({"params": params}, H, method="logits")
    want = np.asarray(H) @ _reference_rows(name, params, np.arange(V)).T
    assert got.shape == (H.shape[0], V)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qr-mult"])
def test_the_generic_blocked_path_scores_tables_without_a_factorised_score(monkeypatch, name):
    # qr-mult has no factorised score; its logits must come from ItemTable.logits' blocks.
    calls = []
    real = tables.base.jax.lax.map
    monkeypatch.setattr(tables.base.jax.lax, "map", lambda f, xs: calls.append(xs.shape) or real(f, xs))
    monkeypatch.setattr(tables.base, "SCORE_BLOCK", 16)
    table, params = _table(KINDS[name])
    table.apply({"params": params}, H, method="logits")
    assert calls == [(4, 16)]


@pytest.mark.parametrize("tail_from", [10**6, 1])
def test_tt_rows_are_the_same_from_per_id_slices_and_from_the_shared_tail(monkeypatch, tail_from):
    """Both lookups (the shared core_2 x core_3 contraction for many ids, per-id slices for a few)
    give the hand-indexed rows, and the same gradients."""
    from cprec.model.tables import tt

    table, params = _table(KINDS["tt"])
    monkeypatch.setattr(tt, "TAIL_FROM", tail_from)
    np.testing.assert_allclose(table.apply({"params": params}, IDS), _reference_rows("tt", params, IDS),
                               rtol=1e-5, atol=1e-6)
    grad = lambda p: jax.grad(lambda q: jnp.sum(table.apply({"params": q}, IDS) ** 2))(p)
    got = grad(params)
    monkeypatch.setattr(tt, "TAIL_FROM", 1 if tail_from > 1 else 10**6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), got, grad(params))


def test_tt_scores_and_rebuilds_its_table_as_a_train_not_row_by_row(monkeypatch):
    from cprec.model.tables.tt import TTTable

    table, params = _table(KINDS["tt"])
    rows = _reference_rows("tt", params, np.arange(V))

    def no_row_lookups(self, ids):
        raise AssertionError("TT scoring gathered rows one by one")

    monkeypatch.setattr(TTTable, "__call__", no_row_lookups)
    np.testing.assert_allclose(table.apply({"params": params}, method="dense"), rows, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table.apply({"params": params}, H, method="logits"), np.asarray(H) @ rows.T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(KINDS))
def test_parameter_counts_equal_each_formula(name):
    spec = KINDS[name]
    _, params = _table(spec)
    options = dict(spec.get("options", ()))
    formula = {
        "full": V * D,
        "blockwise": 10 * D + 20 * 4 + 31 * 2 + (4 + 2) * D,
        "lowrank": V * 3 + 3 * D,
        "hash": 13 * D,
        "qr-mult": math.ceil(V / 7) * D + 7 * D,
        "qr-add": math.ceil(V / 7) * D + 7 * D,
        "qr-concat": math.ceil(V / 7) * (D - D // 2) + 7 * (D // 2),
        "tt": 4 * 2 * 3 + 4 * 3 * 2 * 3 + 4 * 3 * 2,
        "jpq": 5 * D + V * 1,  # centroids, and the packed codes (counted at their float32 storage)
    }[name]
    assert count_params(params) == formula
    if spec["kind"] in SIZED:
        assert SIZED[spec["kind"]].param_count(V, D, options) == formula


def test_hash_collisions_score_alike_and_qr_keeps_every_item_unique():
    table, params = _table(KINDS["hash"])
    logits = np.asarray(table.apply({"params": params}, H, method="logits"))
    buckets = _numpy_hash(np.arange(V), 13)
    a, b = [np.flatnonzero(buckets == buckets[1])[:2]][0]
    np.testing.assert_array_equal(logits[:, a], logits[:, b])
    table, params = _table(KINDS["qr-mult"])
    dense = np.asarray(table.apply({"params": params}, method="dense"))
    assert len({tuple(row) for row in dense.round(6)}) == V


# ----------------------------------------------------------------------------------------------
# Budget solvers

COUNTS = np.concatenate([[0], np.sort(np.random.default_rng(2).zipf(1.3, size=2999).clip(max=10**6))[::-1]])


def _rival(tmp_path, embedding, budget, **model):
    return tiny_config(tmp_path, embedding=embedding, budget=budget, tie_embeddings=True, output_projection=True,
                       budget_baseline="untied", sharing="cross_block", dim=32, **model)


@pytest.mark.parametrize("embedding", ["lowrank", "hash", "qr", "mde", "tt", "jpq"])
@pytest.mark.parametrize("budget", ["4x", "8x", "16x"])
def test_each_solver_lands_within_90_to_100_percent_of_the_budget(tmp_path, embedding, budget):
    config = _rival(tmp_path, embedding, budget, **({"jpq_centroids": 64} if embedding == "jpq" else {}))
    validate_config(config)
    choice = budget_choice(config, COUNTS)
    model = build_model(config, COUNTS)
    total = count_params(jax.eval_shape(lambda: init_params(model, 0)))
    assert total == choice.params
    assert total <= choice.target
    # One rank of the low-rank table is V + dim parameters: where that step is more than a tenth of
    # the budget, the largest rank that fits may land lower (and the summary says how much lower).
    # So is one packed float of RecJPQ's codes per item (V parameters: up to 4 more sub-spaces at 64 centroids).
    step = {"lowrank": len(COUNTS) + 32, "jpq": len(COUNTS)}.get(embedding, 0.1 * choice.target)
    largest = embedding == "jpq" and dict(choice.options)["jpq_splits"] == 32  # one code per dimension: no larger table
    assert total >= 0.9 * choice.target or choice.target - total < step or largest, (total, choice.target)
    plain = build_model(tiny_config(tmp_path, dim=32), COUNTS)  # untied, no output projection: the ratio's baseline
    assert choice.baseline == count_params(jax.eval_shape(lambda: init_params(plain, 0)))
    assert f"({choice.baseline / total:.2f}x" in choice.summary()


def test_an_impossible_budget_names_the_smallest_reachable_one(tmp_path):
    config = _rival(tmp_path, "lowrank", "1000x")
    with pytest.raises(ConfigError, match=r"cannot be reached by the lowrank table: .* at least [\d,]+$"):
        budget_choice(config, COUNTS)
    smallest = int(str(pytest.raises(ConfigError, budget_choice, config, COUNTS).value).split()[-1].replace(",", ""))
    choice = budget_choice(_rival(tmp_path, "lowrank", str(smallest)), COUNTS)
    assert choice.params == smallest and dict(choice.options)["rank"] == 1


def test_explicit_sizes_win_over_the_budget(tmp_path):
    config = _rival(tmp_path, "hash", "20x", hash_rows=5)
    assert table_options(config, COUNTS) == (("hash_rows", 5),)


# ----------------------------------------------------------------------------------------------
# Tied gradients: the table gets the sum of its input and output uses

X = jnp.asarray(np.random.default_rng(4).integers(0, 61, size=(4, 10)), jnp.int32)
Y = jnp.asarray(np.random.default_rng(5).integers(1, 61, size=(4, 10)), jnp.int32)
SMALL_COUNTS = np.concatenate([[0], np.arange(60, 0, -1)])
TIED = {"lowrank": dict(rank=3), "hash": dict(hash_rows=13), "qr": dict(qr_buckets=7), "mde": dict(mde_blocks=4),
        "tt": dict(tt_rank=2), "jpq": dict(jpq_splits=3, jpq_centroids=5)}


@pytest.mark.slow
@pytest.mark.parametrize("embedding", list(TIED))
@pytest.mark.parametrize("softmax", ["full", "sampled"])
def test_tied_gradient_is_the_sum_of_both_uses(tmp_path, embedding, softmax):
    tied = build_model(tiny_config(tmp_path, embedding=embedding, softmax=softmax, tie_embeddings=True,
                                   **TIED[embedding]), SMALL_COUNTS)
    untied = build_model(tiny_config(tmp_path, embedding=embedding, softmax=softmax, **TIED[embedding]), SMALL_COUNTS)
    params = init_params(tied, 0)
    table = make_table(embedding, 61, 8, tied.cutoffs, tied.ranks, tied.table_options)

    def split_loss(p_in, p_out):  # the untied model whose output kernel is the output copy's table
        kernel = table.apply({"params": p_out}, method="dense").T
        p = {**params, "embed": p_in, "head": {"kernel": kernel}}
        return untied.apply({"params": p}, X, Y, method=NextItNet.loss)[0]

    loss = lambda p: tied.apply({"params": p}, X, Y, method=NextItNet.loss)[0]
    np.testing.assert_allclose(loss(params), split_loss(params["embed"], params["embed"]), rtol=1e-6)
    g_in, g_out = jax.grad(split_loss, argnums=(0, 1))(params["embed"], params["embed"])
    g_tied = jax.grad(loss)(params)["embed"]
    for name in g_tied:
        np.testing.assert_allclose(g_tied[name], g_in[name] + g_out[name], rtol=1e-4, atol=1e-6)
        if name == "codes":  # RecJPQ's codes are constants: no use reaches them
            assert float(jnp.abs(g_tied[name]).sum()) == 0
        else:
            assert float(jnp.abs(g_out[name]).sum()) > 0  # the output use really reaches every table


# CI: the factorised (lowrank), generic blocked (qr) and gathered (jpq) scores; the rest with -m slow.
@pytest.mark.parametrize("embedding", [e if e in ("lowrank", "qr", "jpq") else pytest.param(e, marks=pytest.mark.slow)
                                       for e in TIED])
def test_tied_top_k_is_the_exact_top_of_the_full_log_prob(tmp_path, embedding):
    model = build_model(tiny_config(tmp_path, embedding=embedding, tie_embeddings=True, output_projection=True,
                                    **TIED[embedding]), SMALL_COUNTS)
    params = init_params(model, 1)
    lp = model.apply({"params": params}, X, method=NextItNet.last_log_prob)
    np.testing.assert_allclose(jnp.exp(lp).sum(axis=1), 1.0, rtol=1e-5)
    scores, ids, _ = model.apply({"params": params}, X, 7, method=NextItNet.top_k)
    ref_scores, ref_ids = jax.lax.top_k(lp[:, 1:], 7)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(lp), np.asarray(ids), 1), np.asarray(scores))


def test_tt_evaluation_and_top_k_score_against_the_table_rebuilt_once(tmp_path, monkeypatch):
    """Evaluating many batches rebuilds a TT-Rec table once per parameters (``serving_stats``), then
    ranks each batch by ``h E^T`` of those rows: the same ranks as scoring from the cores per batch;
    and top_k given those stats scores from them too."""
    from cprec.eval.evaluate import eval_ranks, evaluate_split, make_rank_fn
    from cprec.eval.metrics import rank_metrics
    from cprec.model.tables.tt import TTTable

    model = build_model(tiny_config(tmp_path, embedding="tt", tie_embeddings=True, **TIED["tt"]), SMALL_COUNTS)
    params = init_params(model, 1)
    inputs = np.asarray(np.random.default_rng(6).integers(0, 61, size=(40, 10)), np.int32)
    targets = np.asarray(np.random.default_rng(7).integers(1, 61, size=40), np.int32)
    per_batch = jax.jit(lambda x, y: eval_ranks(model.apply({"params": params}, x, method="last_log_prob"), y))
    ranks = np.concatenate([np.asarray(per_batch(inputs[s:s + 8], targets[s:s + 8])[0]) for s in range(0, 40, 8)])
    calls = {"dense": 0, "logits": 0}
    for name in calls:
        real = getattr(TTTable, name)
        monkeypatch.setattr(TTTable, name, lambda self, *a, _n=name, _r=real: (
            calls.__setitem__(_n, calls[_n] + 1), _r(self, *a))[1])
    got = evaluate_split(make_rank_fn(model), params, inputs, targets, 8, (10,))
    assert calls == {"dense": 1, "logits": 0}  # traced once for the stats; no batch scores from the cores
    assert got == pytest.approx(rank_metrics(ranks, (10,)))
    # The served top-N (Recommender, the latency bench) passes the same stats to top_k ...
    stats = model.apply({"params": params}, method="serving_stats")
    top = lambda stats: model.apply({"params": params}, jnp.asarray(inputs), 20, stats, method="top_k")[:2]
    # ... and so does the served candidate scoring (Recommender.score).
    cand = jnp.asarray(np.random.default_rng(8).integers(0, 62, size=(40, 5)), jnp.int32)
    score = lambda stats: model.apply({"params": params}, model.apply({"params": params}, jnp.asarray(inputs),
                                      method="encode")[:, -1], cand, stats, method=lambda m, *a: m.head.score(*a))
    (scores, ids), cand_scores = top(stats), score(stats)
    assert calls["logits"] == 0
    (want_scores, want_ids), want_cand = top(None), score(None)
    assert calls["logits"] == 2
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(cand_scores, want_cand, rtol=1e-5, atol=1e-5)


def test_tt_shapes_hold_every_item_and_factor_the_width():
    from cprec.model.tables.tt import tt_dim_shape, tt_item_shape

    for v in (2, 61, 1000, 30001, 1_000_001):
        v1, v2, v3 = tt_item_shape(v)
        assert v1 * v2 * v3 >= v and v1 * v2 * (v3 - 1) < v  # no wasted last slab
    for d in (8, 48, 64, 7):
        assert math.prod(tt_dim_shape(d)) == d
    assert tt_dim_shape(64) == (4, 4, 4)


# ----------------------------------------------------------------------------------------------
# RecJPQ: codes fixed before training, scores gathered from sub-scores


def test_jpq_gathered_scores_and_blocked_scores_equal_the_dense_reconstruction(monkeypatch):
    from cprec.model.tables import jpq

    table, params = _table(KINDS["jpq"])
    want = np.asarray(H) @ _reference_rows("jpq", params, np.arange(V)).T
    monkeypatch.setattr(tables.base, "SCORE_BLOCK", 7)  # several blocks, the last one padded
    for rows in (H.shape[0], 0):  # the gathered sums (few rows), then the blocked rebuild
        monkeypatch.setattr(jpq, "GATHER_ROWS", rows)
        np.testing.assert_allclose(table.apply({"params": params}, H, method="logits"), want, rtol=1e-5, atol=1e-5)


def test_jpq_svd_codes_are_deterministic_balanced_and_follow_the_data():
    from cprec.model.tables.jpq import pack_codes, random_codes, svd_codes, unpack_codes

    rng = np.random.default_rng(0)
    # Two communities of windows: items 1-100 and 101-200 never meet, so the SVD's first component
    # separates them and the first sub-space's codes split the two groups.
    windows = np.concatenate([rng.integers(1, 101, (150, 11)), rng.integers(101, 201, (150, 11))])
    codes = svd_codes(windows, 201, splits=4, centroids=8, seed=0)
    np.testing.assert_array_equal(codes, svd_codes(windows, 201, splits=4, centroids=8, seed=0))
    assert codes.shape == (201, 4) and codes.min() == 0 and codes.max() == 7
    for k in range(4):  # equal-count bins: every centroid of every sub-space holds 25 or 26 items
        assert set(np.bincount(codes[:, k], minlength=8)) <= {25, 26}
    first = codes[1:, 0]
    assert {len(set(first[:100]) & set(first[100:]))} <= {0, 1}  # the communities share at most a boundary bin
    np.testing.assert_array_equal(np.asarray(unpack_codes(jnp.asarray(pack_codes(codes, 8)), 4, 8)), codes)
    assert not np.array_equal(random_codes(201, 4, 8, seed=0), random_codes(201, 4, 8, seed=1))


def test_jpq_codes_come_from_the_svd_and_never_change_in_training(tmp_path):
    from cprec.model.builder import init_from_data
    from cprec.model.tables.jpq import svd_codes, unpack_codes
    from cprec.train import make_optimizer, make_train_step, new_train_state

    config = tiny_config(tmp_path, embedding="jpq", jpq_splits=3, jpq_centroids=5, tie_embeddings=True)
    config.optim.weight_decay = config.optim.table_weight_decay = 0.1  # decay must not reach the codes either
    model = build_model(config, SMALL_COUNTS)
    windows = np.asarray(jnp.concatenate([X, Y[:, -1:]], axis=1))
    params = init_from_data(config, model, init_params(model, 0), windows)
    np.testing.assert_array_equal(np.asarray(unpack_codes(params["embed"]["codes"], 3, 5)),
                                  svd_codes(windows, 61, 3, 5, seed=config.seed))
    before = jax.tree.map(np.array, params)  # the step donates its state
    tx = make_optimizer(config, 10)
    state, step = new_train_state(params, tx), make_train_step(model, tx, 0)
    for _ in range(3):
        state, _ = step(state, jnp.asarray(windows))
    np.testing.assert_array_equal(state["params"]["embed"]["codes"], before["embed"]["codes"])
    assert not np.allclose(state["params"]["embed"]["centroids"], before["embed"]["centroids"])
