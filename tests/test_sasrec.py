"""SASRec: attention against a numpy reference, causality, padding, sharing counts, and training with CpRec's layers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.config import validate_config
from cprec.errors import ConfigError
from cprec.model.builder import build_model, count_params, init_params
from cprec.model.sasrec import AttentionBlock, SASRec, attention_mask, block_sharing_index
from tests.helpers import tiny_config

COUNTS = np.concatenate([[0], np.arange(60, 0, -1)])
V, D, L, INNER = 61, 8, 10, 16


def _sasrec(tmp_path, **model):
    config = tiny_config(tmp_path, backbone="sasrec", num_blocks=2, num_heads=2, inner_dim=INNER, **model)
    validate_config(config)
    return build_model(config, COUNTS)


def _numpy_block(p, x, mask, heads):
    """One post-LN attention block in numpy (RecBole's SASRec layer), no dropout."""
    dense = lambda name, y: y @ p[name]["kernel"] + p[name]["bias"]
    norm = lambda name, y: ((y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-12)
                            * p[name]["scale"] + p[name]["bias"])
    b, t, d = x.shape
    w = d // heads
    q, k, v = (dense(n, x).reshape(b, t, heads, w) for n in ("query", "key", "value"))
    scores = np.einsum("bqhw,bkhw->bhqk", q, k) / math.sqrt(w)
    scores = np.where(mask, scores, -10000.0)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("bhqk,bkhw->bqhw", probs, v).reshape(b, t, d)
    x = norm("ln_attn", dense("attn_out", context) + x)
    inner = dense("ffn_in", x)
    gelu = 0.5 * inner * (1 + np.vectorize(math.erf)(inner / math.sqrt(2)))
    return norm("ln_ffn", dense("ffn_out", gelu) + x)


def test_attention_block_equals_the_numpy_reference_with_causal_and_padding_masks():
    rng = np.random.default_rng(0)
    ids = np.array([[0, 0, 0, 5, 9, 2, 7], [3, 1, 4, 1, 5, 9, 2]])
    x = rng.normal(size=(2, 7, D)).astype(np.float32)
    block = AttentionBlock(D, 2, INNER, 0.0, 0.0)
    mask = attention_mask(jnp.asarray(ids))
    params = block.init(jax.random.PRNGKey(1), x, mask)["params"]
    params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
    got = block.apply({"params": params}, x, mask)
    np_mask = np.tril(np.ones((7, 7), bool))[None] & (ids > 0)[:, None, :]
    np.testing.assert_allclose(got, _numpy_block(params, x, np_mask[:, None], 2), rtol=1e-4, atol=1e-4)


def test_no_position_sees_a_later_one(tmp_path):
    model = _sasrec(tmp_path)
    params = init_params(model, 0)
    rng = np.random.default_rng(2)
    x = rng.integers(1, V, size=(3, L))
    h = model.apply({"params": params}, jnp.asarray(x), method="encode")
    for t in range(L - 1):
        changed = x.copy()
        changed[:, t + 1:] = rng.integers(1, V, size=(3, L - t - 1))
        h2 = model.apply({"params": params}, jnp.asarray(changed), method="encode")
        np.testing.assert_allclose(h2[:, : t + 1], h[:, : t + 1], rtol=1e-5, atol=1e-5)
        assert not np.allclose(h2[:, t + 1:], h[:, t + 1:])


def test_left_padding_does_not_change_the_last_hidden_state(tmp_path):
    # Positions count from the first real item, padding is masked: a history reads the same in any width.
    model = _sasrec(tmp_path)
    params = init_params(model, 0)
    history = np.array([[4, 8, 15, 16]])
    widths = [np.pad(history, ((0, 0), (w - 4, 0))) for w in (4, 7, L)]
    last = [np.asarray(model.apply({"params": params}, jnp.asarray(x), method="encode"))[:, -1] for x in widths]
    for other in last[1:]:
        np.testing.assert_allclose(other, last[0], rtol=1e-5, atol=1e-5)


def _block_params(d, inner):
    return 4 * (d * d + d) + 2 * 2 * d + (d * inner + inner) + (inner * d + d)


@pytest.mark.parametrize("sharing, unique", [("none", 4), ("cross_block", 1), ("adjacent_block", 2)])
def test_parameter_count_by_formula_for_every_sharing_scheme(tmp_path, sharing, unique):
    model = build_model(tiny_config(tmp_path, backbone="sasrec", num_blocks=4, inner_dim=INNER, sharing=sharing), COUNTS)
    params = init_params(model, 0)
    want = V * D + L * D + 2 * D + unique * _block_params(D, INNER) + D * V  # table, positions, LN, blocks, output
    assert count_params(params) == want
    assert block_sharing_index(sharing, 4)[0] == unique


@pytest.mark.parametrize("sharing", ["cross_layer", "adjacent_layer"])
def test_conv_only_sharing_schemes_are_a_config_error(tmp_path, sharing):
    with pytest.raises(ConfigError, match=r"no analogue in SASRec.*none, cross_block, adjacent_block"):
        validate_config(tiny_config(tmp_path, backbone="sasrec", sharing=sharing))


@pytest.mark.slow  # kept out of CI: another test covers this path faster (run with -m slow)
def test_sasrec_with_cprec_layers_trains_and_evaluates(tmp_path):
    from cprec.train import train_and_evaluate

    config = tiny_config(tmp_path / "cache", backbone="sasrec", num_blocks=2, inner_dim=INNER, dropout=0.2,
                         attn_dropout=0.2, embedding="blockwise", softmax="tree", cutoffs=(0.3, 0.6),
                         tie_embeddings=True, sharing="cross_block")
    test = train_and_evaluate(config, tmp_path / "run")
    assert 0.0 <= test["mrr@5"] <= 1.0
    import json
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["model"]["backbone"] == "sasrec" and stored["report"]["params/compression_ratio"] > 1
    from cprec.eval.pretrained import load_run
    run = load_run(tmp_path / "run")
    assert isinstance(run.model, SASRec) and run.model.embedding == "blockwise"


@pytest.mark.slow
def test_a_sasrec_run_exports_and_serves_its_top20_and_sessions(tmp_path):
    """Export (float32 with StableHLO) -> Recommender gives the run's top-20; a session's appends
    (past a full window) give what a stateless request for the same history gives."""
    from cprec.eval.pretrained import load_run
    from cprec.export import main as export
    from cprec.serve.artifact import load_artifact
    from cprec.serve.recommender import Recommender
    from cprec.train import train_and_evaluate

    config = tiny_config(tmp_path / "cache", backbone="sasrec", num_blocks=2, inner_dim=INNER, tie_embeddings=True)
    config.train.num_steps = 4
    train_and_evaluate(config, tmp_path / "run")
    run = load_run(tmp_path / "run")
    x = np.asarray(run.data.test_inputs[:5])
    _, ref_ids, _ = run.model.apply({"params": run.params}, jnp.asarray(x), 20, method="top_k")
    assert export([str(tmp_path / "run"), str(tmp_path / "art"), "--stablehlo-batch-sizes", "5"]) == 0
    art = load_artifact(tmp_path / "art")
    assert isinstance(art.model(), SASRec) and art.model() == run.model.clone(capacities=None)
    rec = Recommender(art)
    histories = [[art.item_ids[i] for i in row if i > 0] for row in x]
    got = [[art.item_ids.index(i) for i in r.items] for r in rec.recommend(histories, n=20, exclude_seen=False)]
    np.testing.assert_array_equal(got, np.asarray(ref_ids))
    long = [art.item_ids[i] for i in np.random.default_rng(3).integers(1, V, size=L + 6)]  # past a full window
    session = rec.session(long[:3])
    for item in long[3:]:
        session.append([item])
    [want] = rec.recommend([long], n=10, exclude_seen=False)
    assert session.recommend(10, exclude_seen=False).items == want.items


@pytest.mark.slow
def test_kv_cache_state_equals_a_full_recompute_and_batches_equal_single_rows(tmp_path):
    from cprec.serve import kv_cache
    from cprec.serve.quantize import dequantize_tree, is_quantized, quantize_params

    model = _sasrec(tmp_path)
    params = init_params(model, 4)
    rng = np.random.default_rng(5)
    streams = [list(rng.integers(1, V, size=n)) for n in (3, L, L + 7)]  # short, exactly full, slid past full

    def recompute(history):
        window = jnp.asarray([history[-L:]])
        h, keys, values = model.apply({"params": params}, window, method="encode_cached")
        return np.asarray(h[0, -1]), np.asarray(keys[0]), np.asarray(values[0])

    rows = jax.tree.map(lambda a: np.repeat(a, 3, axis=0), kv_cache.padding_row(model, params))
    width = max(map(len, streams))
    items = np.zeros((3, width), np.int32)
    for r, s in enumerate(streams):
        items[r, width - len(s):] = s
    batched, _ = kv_cache.append_many(model, params, rows, jnp.asarray(items),
                                      lengths=jnp.asarray([len(s) for s in streams]))
    chunked, _ = kv_cache.append_many(model, params, rows, jnp.asarray(items),  # full windows re-encoded row by row
                                      lengths=jnp.asarray([len(s) for s in streams]), encoder_rows=1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), chunked, batched)
    # int8 item tables go in as they are stored (each branch dequantizes what it reads): the same
    # state as the dequantized tables give
    q = quantize_params(params)
    assert any(is_quantized(x) for x in jax.tree.leaves(q, is_leaf=is_quantized))
    lengths = jnp.asarray([len(s) for s in streams])
    from_int8, _ = kv_cache.append_many(model, q, rows, jnp.asarray(items), lengths=lengths)
    from_float, _ = kv_cache.append_many(model, dequantize_tree(q), rows, jnp.asarray(items), lengths=lengths)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), from_int8, from_float)
    for r, stream in enumerate(streams):
        single = kv_cache.padding_row(model, params)
        for item in stream:
            single, h = kv_cache.append(model, params, single, jnp.asarray([item]))
        h_ref, keys_ref, values_ref = recompute(stream)
        n = min(len(stream), L)
        assert int(single["count"][0]) == n and list(np.asarray(single["ids"][0, :n])) == stream[-L:]
        np.testing.assert_allclose(h[0], h_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(single["keys"][0, :, :n], keys_ref[:, -n:], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(single["values"][0, :, :n], values_ref[:, -n:], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batched["h"][r], h_ref, rtol=1e-5, atol=1e-5)
        encoded, _ = kv_cache.encode_state(model, params, jnp.asarray([[0, 0] + stream[-L:][2:]]))
        assert int(encoded["count"][0]) == n - 2
