"""cprec.serve.Recommender against the plain model: raw ids, exclusions, budgets, scores, sessions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cprec.model.nextitnet import NextItNet
from cprec.serve.artifact import Artifact, model_kwargs_of
from cprec.serve.quantize import quantize_params
from cprec.serve.recommender import Recommender, RequestError, SessionStore, default_length_buckets

V, D, L = 60, 8, 10
RIVALS = {"lowrank": dict(embedding="lowrank", table_options=(("rank", 3),)),
          "hash": dict(embedding="hash", table_options=(("hash_rows", 23),)),
          "qr": dict(embedding="qr", table_options=(("qr_buckets", 8), ("qr_op", "mult"))),
          "mde": dict(embedding="mde", cutoffs=(4, 15, V), ranks=(D, 5, 2))}


def _artifact(softmax="tree", quantized=False) -> Artifact:
    kw = dict(num_items=V, dim=D, dilations=(1, 2, 1, 4), sharing="cross_block")
    if softmax.startswith("tree"):
        kw.update(embedding="blockwise", softmax="tree", cutoffs=(12, 30, V), ranks=(D, 4, 2))
    if softmax == "tree-tied":  # CpRec with every table and projection tied, and the output projection
        kw.update(tie_embeddings=True, tie_projections=True, output_projection=True)
    if softmax in RIVALS:  # a compressed item table, tied to the full softmax's output
        kw.update(RIVALS[softmax], tie_embeddings=True, output_projection=True)
    model = NextItNet(**kw)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    # Non-zero biases and LayerNorm offsets, and scores spread enough that the top-n is not all ties.
    params = jax.tree.map(lambda x: np.asarray(x) * 3 + 0.3 * rng.standard_normal(x.shape).astype(np.float32), params)
    if quantized:
        params = quantize_params(params)
    ids = [None] + [f"movie-{i}" for i in range(1, V)]  # raw ids are strings here
    return Artifact(model_kwargs_of(model), L, params, ids, np.arange(V)[::-1].copy(), {})


def _raw(ids):
    return [f"movie-{i}" for i in ids]


def _reference_top(model, params, histories, n, exclude_seen, window=L):
    """Full log-softmax over all items of the plain model, a numpy sort."""
    x = np.zeros((len(histories), window), np.int32)
    for r, h in enumerate(histories):
        h = h[-window:]
        x[r, window - len(h):] = h
    lp = np.array(model.apply({"params": params}, jnp.asarray(x), method=NextItNet.last_log_prob))
    lp[:, 0] = -np.inf
    if exclude_seen:
        for r, h in enumerate(histories):
            lp[r, h] = -np.inf
    return np.argsort(-lp, axis=1, kind="stable")[:, :n], np.sort(lp, axis=1)[:, ::-1][:, :n], lp


# Two rivals: the factorised score (lowrank) and the generic blocked one (qr); tests/test_tables.py has the rest.
# CI serves the two output layers (tree and full); the tied and rival tables run with -m slow, and
# tests/test_tables.py checks every rival's top-k against its full log_prob in CI.
@pytest.fixture(scope="module", params=["tree", "full", *(pytest.param(k, marks=pytest.mark.slow)
                                                         for k in ("tree-tied", "lowrank", "qr"))])
def served(request):
    art = _artifact(request.param)
    return art, Recommender(art)


HISTORIES = [[3, 5, 7], [40, 41, 2, 2, 13, 58, 59, 1, 30, 31, 32, 33], [20]]


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_recommend_matches_the_full_softmax_in_raw_ids(served, exclude_seen):
    art, rec = served
    got = rec.recommend([_raw(h) for h in HISTORIES], n=15, exclude_seen=exclude_seen)
    ids, scores, _ = _reference_top(art.model(), art.params, HISTORIES, 15, exclude_seen)
    for r, res in enumerate(got):
        assert res.exact and res.unknown_items == []
        np.testing.assert_allclose(res.scores, scores[r], rtol=1e-5, atol=1e-5)
        assert res.items == _raw(ids[r])  # scores are spread: no ties to reorder
        if exclude_seen:
            assert not set(res.items) & set(_raw(HISTORIES[r]))


def test_exclude_seen_is_the_most_recent_e_distinct_items_for_requests_and_sessions(served):
    art, _ = served
    rec, stream = Recommender(art, max_exclude=4), Recommender(art, context="stream", max_exclude=4)
    history = [3, 5, 7, 9, 11, 13, 5, 9]  # the 4 most recent distinct: 9, 5, 13, 11 (3 and 7 are older)
    recent = [11, 13, 5, 9]
    _, _, lp = _reference_top(art.model(), art.params, [history], 10, exclude_seen=False, window=L)
    lp[0, recent] = -np.inf
    want = _raw(np.argsort(-lp[0], kind="stable")[:V - 1 - len(recent)])  # every item but those 4 (and padding)
    [got] = rec.recommend([_raw(history)], n=V - 1)
    assert got.items == want and {"movie-3", "movie-7"} <= set(want)  # beyond E: recommendable again
    session = stream.session(_raw(history[:3]))
    for item in history[3:]:
        session.append(_raw([item]))
    assert list(session.seen) == recent  # bounded, oldest first
    assert session.recommend(V - 1).items == stream.recommend([_raw(history)], n=V - 1)[0].items
    with pytest.raises(RequestError, match="at most max_exclude=4"):
        rec.top(np.zeros((1, D), np.float32), 5, [[1, 2, 3, 4, 5]], [None])


def test_unknown_ids_are_skipped_and_reported(served):
    _, rec = served
    [with_unknown] = rec.recommend([["movie-3", "new-item", "movie-5", 999_999, "movie-7"]], n=5)
    [plain] = rec.recommend([_raw([3, 5, 7])], n=5)
    assert with_unknown.unknown_items == ["new-item", 999_999]
    assert with_unknown.items == plain.items
    [empty] = rec.recommend([["nothing-known"]], n=3)
    assert len(empty.items) == 3 and empty.unknown_items == ["nothing-known"]


def test_long_histories_are_truncated_to_what_the_model_sees(served):
    _, rec = served
    long = list(np.random.default_rng(1).integers(1, V, 5000))
    [a] = rec.recommend([_raw(long)], n=5, exclude_seen=False)
    [b] = rec.recommend([_raw(long[-L:])], n=5, exclude_seen=False)
    assert a.items == b.items


def test_bad_n_is_a_request_error(served):
    _, rec = served
    for n in (0, -1, V, 2.5, True):
        with pytest.raises(RequestError, match="is invalid: ask for 1 to"):
            rec.recommend([_raw([1])], n=n)


@pytest.mark.slow
def test_cluster_budget_trades_exactness(served):
    art, rec = served
    full = rec.recommend([_raw(h) for h in HISTORIES], n=25, exclude_seen=False)
    none = rec.recommend([_raw(h) for h in HISTORIES], n=25, exclude_seen=False, max_clusters=0)
    if art.model().softmax == "full":
        assert all(r.exact for r in none) and [r.items for r in none] == [r.items for r in full]
        return
    for a, b in zip(full, none):
        # n = 25 > the 11 real head items: without any tail cluster the list cannot be exact.
        assert a.exact and not b.exact and len(b.items) == 11


def test_padding_rows_of_a_batch_expand_no_tail_cluster(served):
    art, rec = served
    _, budgets = rec._top_inputs([[1], [], [2]], [None, 0, 5], rows=4)  # 3 requests padded to the bucket of 4
    t = rec.num_tail_clusters
    assert budgets.tolist() == [t, 0, min(5, t), 0]
    if art.model().softmax == "tree":  # and the requests' answers are those of one-row batches
        batch = rec.recommend([_raw(h) for h in HISTORIES], n=25)
        assert [r.items for r in batch] == [rec.recommend([_raw(h)], n=25)[0].items for h in HISTORIES]


def test_score_equals_the_full_log_prob(served):
    art, rec = served
    _, _, lp = _reference_top(art.model(), art.params, [HISTORIES[1]], 1, False)
    cands = [1, 11, 12, 29, 30, 59]
    out = rec.score(_raw(HISTORIES[1]), _raw(cands) + ["unknown"])
    np.testing.assert_allclose(out.scores[:-1], lp[0, cands], rtol=1e-5, atol=1e-5)
    assert out.scores[-1] is None and out.unknown_items == ["unknown"]
    # Batched: rows of different candidate widths, each equal to the full log-prob of its history.
    many = [_raw(cands), ["ghost", *_raw(range(1, V))], _raw([5] + list(range(1, V)) * 9)]  # 532 candidates
    got = rec.score_many([_raw(h) for h in HISTORIES], many)
    _, _, lps = _reference_top(art.model(), art.params, HISTORIES, 1, False)
    for r, (g, c) in enumerate(zip(got, many)):
        ids = [int(x[len("movie-"):]) if x != "ghost" else None for x in c]
        assert [s is None for s in g.scores] == [i is None for i in ids]
        np.testing.assert_allclose([s for s in g.scores if s is not None], lps[r, [i for i in ids if i]],
                                   rtol=1e-5, atol=1e-5)
    assert got[1].unknown_items == ["ghost"]


def test_vectorised_id_lookup_equals_the_dict():
    from cprec.serve.recommender import ItemIds

    for raw in ([None, 10, 3, 7, 2**40], [None, "b", "a", "c"]):
        ids = ItemIds(raw)
        for query in ([7, 3, 11, 2**40, 10], ["a", "zz", "c"], [3, "7", "b"], ["10"], [], [2**70]):
            want = [0 if i is None else i for i in ids.lookup(query)]
            assert ids.lookup_array(query).tolist() == want, (raw, query)


def test_session_appends_equal_the_stream_recommendation(served):
    art, _ = served
    stream = Recommender(art, context="stream")
    history = [40, 41, 2, 13, 58, 59, 1, 30]
    session = stream.session(_raw(history[:3]))
    for item in history[3:]:
        session.append(_raw([item]))
    [want] = stream.recommend([_raw(history)], n=10)
    got = session.recommend(10)
    assert got.items == want.items
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
    assert not set(got.items) & set(_raw(history))


@pytest.mark.parametrize("kind", ["tree", "qr"])
def test_int8_artifact_recommends_like_its_dequantised_model(kind):
    art = _artifact(kind, quantized=True)
    rec = Recommender(art)
    assert any(getattr(leaf, "dtype", None) == np.uint8 or str(getattr(leaf, "dtype", "")) in ("int8", "uint8")
               for leaf in jax.tree.leaves(rec.params))
    from cprec.serve.quantize import dequantize_tree

    ids, scores, _ = _reference_top(art.model(), dequantize_tree(art.params), HISTORIES, 10, True)
    for r, res in enumerate(rec.recommend([_raw(h) for h in HISTORIES], n=10)):
        np.testing.assert_allclose(res.scores, scores[r], rtol=1e-4, atol=1e-4)
        assert res.exact


def test_session_store_is_bounded_lru(served):
    _, rec = served
    store = SessionStore(rec, max_entries=2)
    store.append("a", _raw([1, 2]))
    store.append("b", _raw([3]))
    store.get("a")  # a is now the most recent
    store.append("c", _raw([4]))
    assert "b" not in store and "a" in store and "c" in store and store.evicted == 1
    one = store.get("a").nbytes
    small = SessionStore(rec, max_entries=100, max_bytes=int(2.5 * one))
    for user in "uvwxyz":
        small.append(user, _raw([5]))
    assert len(small) == 2 and small.nbytes <= 2.5 * one
    assert small.delete("z") and not small.delete("z")


@pytest.mark.slow
def test_batched_session_appends_equal_one_at_a_time():
    art = _artifact("tree")  # the output layer does not matter here; the tree one has cluster budgets
    stream = Recommender(art, context="stream", max_batch=2)  # 3 sessions: two batches, one padded
    starts = [HISTORIES[0], [], HISTORIES[2]]
    events = [[_raw([9]), _raw([10, 11])], [_raw([33]), []], [["nope"], _raw([20, 21, 22, 23, 24])]]
    batched = stream.sessions([_raw(h) for h in starts])
    alone = [stream.session(_raw(h)) for h in starts]
    for step in range(2):
        unknown = stream.append_sessions(batched, [e[step] for e in events])
        assert unknown == [["nope"] if (r, step) == (2, 0) else [] for r in range(3)]
        for s, e in zip(alone, events):
            s.append(e[step])
    for b, a in zip(batched, alone):
        for x, y in zip(jax.tree.leaves(b.state), jax.tree.leaves(a.state)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    got = stream.recommend_sessions(batched, n=10, max_clusters=[None, 0, 1])
    for g, a, budget in zip(got, alone, [None, 0, 1]):
        want = a.recommend(10, max_clusters=budget)
        assert g.items == want.items and g.exact == want.exact and g.unknown_items == want.unknown_items
    # Each session equals the stream recommendation of its whole history.
    history = [*_raw(starts[2]), *events[2][0], *events[2][1]]
    [want] = stream.recommend([history], n=10)
    assert got[2].items == stream.recommend_sessions([batched[2]], n=10)[0].items == want.items
    with pytest.raises(RequestError, match="2 lists of items for 3 sessions"):
        stream.append_sessions(batched, [[], []])
    # advance = append + recommend in one call per batch, also for a session without new events.
    more = [_raw([44]), [], _raw([45, 46])]
    fused = stream.advance(batched, more, n=10, max_clusters=[None, 0, 1])
    for a, e in zip(alone, more):
        a.append(e)
    for f, b, a, budget in zip(fused, batched, alone, [None, 0, 1]):
        want = a.recommend(10, max_clusters=budget)
        assert f.items == want.items and f.exact == want.exact
        np.testing.assert_allclose(f.scores, want.scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.state["h"], a.state["h"], rtol=1e-5, atol=1e-5)
        assert b.seen == a.seen


@pytest.mark.slow
def test_per_row_exclusions_and_an_empty_session_start(served):
    art, rec = served
    mixed = rec.recommend([_raw(h) for h in HISTORIES[:2]], n=10, exclude_seen=[True, False])
    assert mixed[0].items == rec.recommend([_raw(HISTORIES[0])], n=10)[0].items
    assert mixed[1].items == rec.recommend([_raw(HISTORIES[1])], n=10, exclude_seen=False)[0].items
    with pytest.raises(RequestError, match="exclude_seen has 1 values for 2 histories"):
        rec.recommend([_raw(h) for h in HISTORIES[:2]], exclude_seen=[True])
    # An empty session starts from the padding state (no encode); appending then matches the stream
    # recommendation of the whole history, computed by encoding it.
    stream = Recommender(art, context="stream")
    session = stream.session()
    session.append(_raw(HISTORIES[1]))
    [want] = stream.recommend([_raw(HISTORIES[1])], n=10)
    assert session.recommend(10).items == want.items


@pytest.mark.slow
@pytest.mark.parametrize("context", ["window", "stream"])
def test_encoding_in_row_chunks_equals_the_whole_batch(context):
    """A batch over the encoder's chunk size runs as lax.map over chunks: same answers as one pass
    (up to float32 rounding: XLA blocks the matmuls of another shape differently)."""
    art = _artifact("tree")
    chunked = Recommender(art, context=context, max_batch=32, encoder_rows=8)
    whole = Recommender(art, context=context, max_batch=32, encoder_rows=None)
    rng = np.random.default_rng(3)
    histories = [_raw(rng.integers(1, V, size=rng.integers(1, 2 * L))) for _ in range(29)]  # bucket 32 = 4 chunks
    np.testing.assert_allclose(chunked.hidden([chunked.ids.internal(h)[0] for h in histories]),
                               whole.hidden([whole.ids.internal(h)[0] for h in histories]), rtol=1e-4, atol=1e-4)
    for a, b in zip(chunked.recommend(histories, n=7), whole.recommend(histories, n=7)):
        assert a.items == b.items
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    sa, sb = chunked.sessions(histories), whole.sessions(histories)
    np.testing.assert_allclose(np.concatenate([s.packed for s in sa]), np.concatenate([s.packed for s in sb]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("context", ["window", "stream"])
def test_short_histories_encode_at_a_narrower_width_with_the_same_answers(context):
    """Length buckets: a batch is encoded at the smallest width holding its longest history, the
    padding before it taken from the activations computed at load; same answers as full width."""
    art = _artifact("tree")
    narrow = Recommender(art, context=context, length_buckets=(2, 4))
    full = Recommender(art, context=context, length_buckets=None)
    width = narrow.context_len
    assert narrow.length_buckets == (2, 4, width) and full.length_buckets == (width,)
    assert Recommender(art, context=context).length_buckets == default_length_buckets(width)
    assert default_length_buckets(50) == (16, 32, 50) and default_length_buckets(151) == (16, 32, 64, 128, 151)
    assert default_length_buckets(10) == (10,)
    assert [narrow.history_width(h) for h in ([[1]], [[1, 2, 3]], [[1], [1] * 5], [[1] * 999])] == [2, 4, width, width]
    rng = np.random.default_rng(4)
    for lengths in ([1, 2], [3, 1, 4], [5, 2], [2 * width]):
        histories = [_raw(rng.integers(1, V, size=n)) for n in lengths]
        known = [narrow.ids.internal(h)[0] for h in histories]
        np.testing.assert_allclose(narrow.hidden(known), full.hidden(known), rtol=1e-5, atol=1e-5)
        for a, b in zip(narrow.recommend(histories, n=7), full.recommend(histories, n=7)):
            assert a.items == b.items
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(RequestError, match="length_buckets"):
        Recommender(art, context=context, length_buckets=(0, 3))
