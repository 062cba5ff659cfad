"""The HTTP server against a real HTTP client on 127.0.0.1: answers, batching, bad input, faults, SIGTERM."""
import asyncio
import json
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn

from cprec.model.nextitnet import NextItNet
from cprec.serve.artifact import model_kwargs_of, save_artifact
from cprec.serve.http import uvicorn_config
from cprec.errors import CprecError
from cprec.serve.recommender import Recommender, SessionStore
from cprec.serve.server import Server, ServerConfig
from tests.helpers import ROOT

V, D, L = 80, 8, 10


def _raw(ids):
    return [f"movie-{i}" for i in ids]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> pathlib.Path:
    kw = dict(num_items=V, dim=D, dilations=(1, 2, 1, 4), sharing="cross_block", embedding="blockwise",
              softmax="tree", cutoffs=(12, 30, 50, V), ranks=(D, 4, 3, 2))
    model = NextItNet(**kw)
    params = model.init(jax.random.PRNGKey(2), jnp.ones((1, 2), jnp.int32))["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda x: np.asarray(x) * 3 + 0.3 * rng.standard_normal(x.shape).astype(np.float32), params)
    return save_artifact(tmp_path_factory.mktemp("server") / "art", model_kwargs=model_kwargs_of(model), max_len=L,
                         params=params, item_ids=[None] + _raw(range(1, V)), item_counts=np.arange(V)[::-1].copy(),
                         dtype="float32", manifest={})


class Running:
    """A uvicorn server in a thread on a socket bound to a free port of 127.0.0.1."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.uv = uvicorn.Server(uvicorn_config(server.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 300
        while not self.uv.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def served(artifact):
    rec = Recommender.load(artifact, max_batch=64)
    # Shapes compile on first use here (warm-up is the command's test below): CI time.
    server = Server(rec, ServerConfig(max_batch_size=64, batch_timeout_ms=20, max_history=1_000,
                                      max_body_bytes=200_000, sessions=100, warmup=False))
    running = Running(server)
    yield running, rec
    running.stop()


def _post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def _concurrently(url, requests):
    """POSTs every (path, body) at once from one asyncio client; the responses in order."""
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))
    return asyncio.run(go())


def test_recommend_single_and_batch_match_the_recommender(served):
    running, rec = served
    histories = [_raw([3, 5, 7]), _raw([40, 41, 2, 13]) + ["new-item"], _raw([20])]
    want = rec.recommend(histories, n=7, max_clusters=[None, 1, None])
    r = _post(running.url, "/v1/recommend", {"history": histories[1], "n": 7, "max_clusters": 1})
    assert r.status_code == 200
    assert r.json() == {"items": want[1].items, "scores": pytest.approx(want[1].scores, rel=1e-5, abs=1e-5),
                        "exact": want[1].exact, "unknown_items": ["new-item"]}
    r = _post(running.url, "/v1/recommend", {"histories": histories, "n": 7})
    got = r.json()["results"]
    assert [g["items"] for g in got][::2] == [w.items for w in want][::2]
    r = _post(running.url, "/v1/recommend", {"history": histories[0], "n": 7, "exclude_seen": False})
    assert r.json()["items"] == rec.recommend([histories[0]], n=7, exclude_seen=False)[0].items


def test_score_matches_the_recommender(served):
    running, rec = served
    body = {"history": _raw([3, 5, 7]), "candidates": _raw([1, 12, 60]) + ["nope"]}
    r = _post(running.url, "/v1/score", body)
    want = rec.score(body["history"], body["candidates"])
    assert r.status_code == 200 and r.json()["scores"][:3] == pytest.approx(want.scores[:3], rel=1e-5, abs=1e-5)
    assert r.json()["scores"][3] is None and r.json()["unknown_items"] == ["nope"]


def test_session_events_follow_a_session(served):
    running, rec = served
    stream = Recommender(rec.artifact, context="stream")
    session = stream.session()
    for events in (_raw([3, 5]), _raw([7]), ["ghost"]):
        r = _post(running.url, "/v1/sessions/user-1/events", {"items": events, "n": 5})
        session.append(events)
        want = session.recommend(5)
        assert r.status_code == 200 and r.json()["items"] == want.items
    assert r.json()["unknown_items"] == ["ghost"]
    assert httpx.delete(running.url + "/v1/sessions/user-1").status_code == 200
    r = httpx.delete(running.url + "/v1/sessions/user-1")
    assert r.status_code == 404 and "no cached session" in r.json()["error"]


def test_concurrent_events_of_one_user_are_all_kept(served):
    running, rec = served

    responses = _concurrently(running.url, [("/v1/sessions/busy/events", {"items": _raw([i]), "n": 3})
                                            for i in range(1, 9)])
    assert all(r.status_code == 200 for r in responses)
    session = running.server.store.get("busy")
    assert set(session.seen) == set(range(1, 9)) and int(session.state["count"][0]) == 8


def test_a_batch_failing_after_its_first_round_applies_no_event_twice(served, monkeypatch):
    """One user twice in a batch: the second round fails after the first one's state was computed.
    The batcher retries each request alone; the state and answers equal those of a clean run."""
    running, rec = served
    server = running.server
    clean = SessionStore(rec)
    first = (_raw([3, 4]), 5)
    second = (_raw([9]), 5)
    want = [clean.advance(["twice"], [items], n)[0] for items, n in (first, second)]
    real, calls = rec.advanced, []

    def fails_on_the_second_round(*args, **kwargs):
        out = real(*args, **kwargs)  # the round's new states exist now
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise RuntimeError("injected after the first round")
        return out
    monkeypatch.setattr(rec, "advanced", fails_on_the_second_round)
    requests = [("twice", items, n, True, None, None) for items, n in (first, second)]
    got = server.batchers["sessions"]._run_isolated(requests)
    assert calls[:2] == [1, 1] and len(calls) == 4  # two rounds, then each request alone
    assert [g["items"] for g in got] == [w.items for w in want]
    assert [g["session"] for g in got] == ["new", "cached"]
    state, clean_state = server.store.get("twice").state, clean.get("twice").state
    assert int(state["count"][0]) == int(clean_state["count"][0]) == 3
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(clean_state)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # kept out of CI: another test covers this path faster (run with -m slow)
def test_a_session_says_whether_it_was_cached_new_or_rebuilt(served):
    running, _ = served
    url = running.url + "/v1/sessions/{}/events"
    assert _post(url.format("fresh"), "", {"items": _raw([3, 5])}).json()["session"] == "new"
    replaced = _post(url.format("fresh"), "", {"items": _raw([7]), "n": 6}).json()
    assert replaced["session"] == "cached"
    assert httpx.delete(url.format("fresh")[:-len("/events")]).status_code == 200
    # The client holds the history: rebuilding from it equals the session it replaces.
    rebuilt = _post(url.format("fresh"), "", {"items": _raw([7]), "n": 6, "history": _raw([3, 5])}).json()
    assert rebuilt["session"] == "rebuilt" and rebuilt["items"] == replaced["items"]
    assert rebuilt["scores"] == pytest.approx(replaced["scores"], rel=1e-5, abs=1e-5)
    # A history sent for a cached session is not read: the cache holds the same events.
    again = _post(url.format("fresh"), "", {"items": [], "n": 6, "history": ["junk"]}).json()
    assert again["session"] == "cached" and again["items"] == replaced["items"]
    # Evicted (the store keeps 100 sessions): the answer says so.
    _concurrently(running.url, [(f"/v1/sessions/filler-{u}/events", {"items": ["movie-1"]}) for u in range(100)])
    assert "fresh" not in running.server.store
    assert _post(url.format("fresh"), "", {"items": _raw([7])}).json()["session"] == "new"


def test_sessions_saved_and_loaded_are_the_same_and_a_foreign_file_is_refused(artifact, tmp_path):
    rec = Recommender.load(artifact, max_batch=4, context="stream")
    store = SessionStore(rec)
    store.advance(["a", "b", 7], [_raw([1, 2]), _raw([3]) + ["ghost"], _raw([4])])
    path = tmp_path / "sessions.npz"
    assert store.save(path) == 3 and not list(tmp_path.glob(".*tmp*"))
    loaded = SessionStore(rec)
    assert loaded.load(path) == 3
    want = store.advance(["a", "b"], [[], _raw([5])], n=6)
    got = loaded.advance(["a", "b"], [[], _raw([5])], n=6)
    assert [g.items for g in got] == [w.items for w in want] and got[1].unknown_items == ["ghost"]
    assert [g.session for g in got] == ["cached", "cached"] and 7 in loaded
    other = dict(rec.artifact.manifest, created="another export")
    foreign = SessionStore(Recommender(rec.artifact._replace(manifest=other), max_batch=4))
    with pytest.raises(CprecError, match="sessions of another model"):
        foreign.load(path)
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CprecError, match="not a readable cprec session file"):
        foreign.load(path)
    assert len(foreign) == 0


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"history": "movie-1"}).encode(), 422, "must be a list"),
    (json.dumps({"history": [1.5]}).encode(), 422, "item ids are integers or strings"),
    (json.dumps({"items": [1]}).encode(), 422, "missing field 'history'"),
    (json.dumps({"history": ["movie-1"], "n": 0}).encode(), 422, "'n' must be an integer from 1 to 79"),
    (json.dumps({"history": ["movie-1"], "n": 80}).encode(), 422, "'n' must be an integer from 1 to 79"),
    (json.dumps({"history": ["movie-1"], "n": "5"}).encode(), 422, "'n' must be an integer"),
    (json.dumps({"history": ["movie-1"], "exclude_seen": "yes"}).encode(), 422, "'exclude_seen' must be true or false"),
    (json.dumps({"history": ["movie-1"], "max_clusters": -1}).encode(), 422, "'max_clusters' must be null"),
    (json.dumps({"history": []}).encode(), 422, "'history' is empty"),
    (json.dumps({"history": list(range(100_000))}).encode(), 413, "larger than 200,000 bytes"),
    (json.dumps({"history": [1] * 5_000}).encode(), 413, "at most 1,000 are accepted"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_a_4xx_with_a_json_error(served, body, status, message):
    running, _ = served
    r = httpx.post(running.url + "/v1/recommend", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert _post(running.url, "/v1/recommend", {"history": ["movie-1"]}).status_code == 200  # still serving


def test_unknown_endpoint_and_method(served):
    running, _ = served
    r = httpx.get(running.url + "/v2/nothing")
    assert r.status_code == 404 and "no endpoint /v2/nothing" in r.json()["error"]
    r = httpx.get(running.url + "/v1/recommend")
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]


def test_requests_are_batched_and_metrics_count_them(served):
    running, _ = served

    responses = _concurrently(running.url, [("/v1/recommend", {"history": _raw([1 + i % 70])}) for i in range(48)])
    assert all(r.status_code == 200 for r in responses)
    text = httpx.get(running.url + "/metrics").text
    sizes = running.server.batch_sizes
    assert sizes.count("recommend") < 48  # 48 concurrent requests took fewer than 48 batches
    assert 'cprec_requests_total{endpoint="recommend",status="200"}' in text
    assert 'cprec_batch_size_bucket{batcher="recommend",le="+Inf"}' in text
    assert "cprec_queue_depth" in text and "cprec_sessions_cached" in text and "cprec_request_seconds_bucket" in text
    assert httpx.get(running.url + "/healthz").json()["status"] == "ok"


def test_a_failing_request_fails_alone(served):
    running, rec = served
    running.server.fail_items = {"movie-66"}

    try:
        responses = _concurrently(running.url, [("/v1/recommend", {"history": _raw([60 + i])}) for i in range(10)])
    finally:
        running.server.fail_items = set()
    statuses = [r.status_code for r in responses]
    assert statuses == [500 if i == 6 else 200 for i in range(10)]
    assert "injected failure" in responses[6].json()["error"]
    assert responses[7].json()["items"] == rec.recommend([_raw([67])], n=20)[0].items
    assert running.server.errors.value("recommend", "500") == 1


def _slowed(monkeypatch, obj, name, seconds, when=lambda *a: True, seen=None):
    """Makes obj.name sleep `seconds` after computing when `when(args)` holds; records its args in `seen`."""
    real = getattr(obj, name)

    def slow(*args, **kwargs):
        if seen is not None:
            seen.append(args)
        out = real(*args, **kwargs)
        if when(*args):
            time.sleep(seconds)
        return out
    monkeypatch.setattr(obj, name, slow)


def test_a_request_whose_client_left_before_its_batch_is_not_computed(served, monkeypatch):
    running, rec = served
    computed = []
    _slowed(monkeypatch, rec, "recommend", 1.5, when=lambda h, *a: ["movie-70"] in h, seen=computed)
    busy = threading.Thread(target=_post, args=(running.url, "/v1/recommend", {"history": ["movie-70"]}))
    busy.start()
    time.sleep(0.3)  # the worker computes the first request now; the next one queues behind it
    with pytest.raises(httpx.TimeoutException):
        httpx.post(running.url + "/v1/recommend", json={"history": ["movie-71"]}, timeout=0.3)
    busy.join()
    assert _post(running.url, "/v1/recommend", {"history": ["movie-2"]}).status_code == 200
    histories = [h for args in computed for h in args[0]]
    assert ["movie-70"] in histories and ["movie-2"] in histories and ["movie-71"] not in histories


def test_queue_depth_counts_the_batch_being_collected():
    def run_batch(reqs):
        if 0 in reqs:
            time.sleep(0.3)  # busy while the next three arrive
        return [r * 2 for r in reqs]

    async def go():
        from cprec.serve.batcher import Batcher

        batcher = Batcher(run_batch, max_batch_size=10, timeout_s=0.5, name="t")
        batcher.start()
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.1)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(1, 4)]
        await asyncio.sleep(0.1)  # queued behind the computing batch
        depth_while_collecting = batcher.depth
        results = await asyncio.gather(first, *tasks)
        depth_after = batcher.depth
        await batcher.stop()
        return depth_while_collecting, results, depth_after
    assert asyncio.run(go()) == (3, [0, 2, 4, 6], 0)


def test_a_request_that_finds_the_worker_idle_goes_at_once():
    spans = []

    async def go():
        from cprec.serve.batcher import Batcher

        batcher = Batcher(lambda reqs: spans.append(time.perf_counter()) or reqs, max_batch_size=10, timeout_s=5.0,
                          name="t")
        batcher.start()
        start = time.perf_counter()
        result = await batcher.submit(7)
        await batcher.stop()
        return start, result
    start, result = asyncio.run(go())
    assert result == 7 and spans[0] - start < 0.5  # not the 5 s timeout


def test_right_after_a_batch_of_several_an_idle_worker_waits_for_company():
    sizes = []

    async def go():
        from cprec.serve.batcher import Batcher

        batcher = Batcher(lambda reqs: sizes.append(len(reqs)) or reqs, max_batch_size=10, timeout_s=0.3, name="t")
        batcher.start()
        await asyncio.gather(batcher.submit(0), batcher.submit(1))  # a batch of two: clients are concurrent
        later = asyncio.create_task(batcher.submit(2))  # finds the worker idle, but the server is busy
        await asyncio.sleep(0.1)
        await asyncio.gather(later, batcher.submit(3))
        await asyncio.sleep(0.4)  # quiet again: a lone request goes at once
        start = time.perf_counter()
        await batcher.submit(4)
        lone_s = time.perf_counter() - start
        await batcher.stop()
        return lone_s
    lone_s = asyncio.run(go())
    assert sizes == [2, 2, 1] and lone_s < 0.2


def test_an_exception_outside_the_compute_fails_its_batch_and_the_batcher_goes_on(served):
    running, _ = served
    batcher = running.server.batchers["recommend"]
    real = batcher.on_batch
    calls = []

    def broken(name, size):
        calls.append(size)
        if len(calls) == 1:
            raise RuntimeError("metrics broke")
        real(name, size)
    batcher.on_batch = broken
    try:
        first = _post(running.url, "/v1/recommend", {"history": ["movie-5"]})
        second = _post(running.url, "/v1/recommend", {"history": ["movie-5"]})
    finally:
        batcher.on_batch = real
    assert first.status_code == 500 and "metrics broke" in first.json()["error"]
    assert second.status_code == 200


@pytest.mark.slow
def test_delete_and_healthz_do_not_wait_for_a_session_batch(served, monkeypatch):
    running, rec = served
    assert _post(running.url, "/v1/sessions/to-delete/events", {"items": ["movie-1"]}).status_code == 200
    _slowed(monkeypatch, rec, "advanced", 2.0)
    events = [("/v1/sessions/many-%d/events" % u, {"items": _raw([1 + u % 70])}) for u in range(64)]
    batch = threading.Thread(target=_concurrently, args=(running.url, events))
    batch.start()
    time.sleep(0.5)  # the 64-session batch computes (2 s) now
    start = time.perf_counter()
    health = httpx.get(running.url + "/healthz", timeout=60)
    health_s = time.perf_counter() - start
    deleted = httpx.delete(running.url + "/v1/sessions/to-delete", timeout=60)
    delete_s = time.perf_counter() - start - health_s
    batch_running = batch.is_alive()
    batch.join()
    assert batch_running and health.status_code == 200 and deleted.status_code == 200
    assert health_s < 0.5 and delete_s < 0.5, (health_s, delete_s)


def test_requests_that_queued_behind_a_batch_do_not_wait_the_timeout_again():
    spans = []

    def run_batch(reqs):
        start = time.perf_counter()
        time.sleep(0.6)  # the worker is busy while the next requests arrive
        spans.append((start, time.perf_counter(), len(reqs)))
        return reqs

    async def go():
        from cprec.serve.batcher import Batcher

        batcher = Batcher(run_batch, max_batch_size=10, timeout_s=0.3, name="t")
        batcher.start()
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.4)  # the first batch is computing now
        results = await asyncio.gather(first, batcher.submit(1), batcher.submit(2))
        await batcher.stop()
        return results
    assert asyncio.run(go()) == [0, 1, 2]
    (_, end1, n1), (start2, _, n2) = spans
    assert (n1, n2) == (1, 2)
    # They arrived 0.5 s before the worker got free: their 0.3 s have passed, so it goes on at once.
    assert start2 - end1 < 0.15


def test_the_start_freezes_long_lived_objects_out_of_the_collector(artifact):
    import gc

    sentinel = [object()]  # alive before the server starts, as the id maps and compiled programs are
    assert any(o is sentinel for o in gc.get_objects())
    rec = Recommender.load(artifact, max_batch=4)
    running = Running(Server(rec, ServerConfig(max_batch_size=4, warmup=False)))
    try:
        assert not any(o is sentinel for o in gc.get_objects())  # in the permanent generation: never traversed
        assert _post(running.url, "/v1/recommend", {"history": ["movie-2"]}).status_code == 200
    finally:
        running.stop()


def _compiled(rec):
    return rec._recommend_fn._cache_size(), rec._append_top_fn._cache_size(), rec._score_fn._cache_size()


def _requests_of_every_shape(rec, store):
    """Batches of 1-4 rows, histories of 1-50 items, n from 3 to 32, 3-79 candidates; the answers."""
    out = []
    for rows in (1, 2, 3, 4):
        for length in (1, 3, 7, 50):
            out.append(rec.recommend([_raw(range(1, length + 1))] * rows, n=min(32, 3 * length)))
            out.append(rec.score_many([_raw(range(1, length + 1))] * rows, [_raw(range(1, min(V, 4 * length)))] * rows))
        out.append(store.advance([f"u{r}" for r in range(rows)], [["movie-3"]] * rows, n=20))
    return out


@pytest.mark.slow  # kept out of CI: another test covers this path faster (run with -m slow)
def test_warmup_compiles_every_batch_size_and_history_width(artifact):
    """After the whole warm-up no request of the default shapes compiles: any batch size up to the
    maximum, any history length (each length bucket), session events, up to 256 candidates."""
    rec = Recommender.load(artifact, max_batch=4, length_buckets=(2, 4))
    server = Server(rec, ServerConfig(max_batch_size=4))
    server.warmup()
    rec.shapes.only_compiled = True  # as the server sets it
    compiled = _compiled(rec)
    assert compiled == (3 * 3, 3, 3)  # batch buckets 1, 2, 4 x widths 2, 4, L; events and scores at 1, 2, 4
    _requests_of_every_shape(rec, server.store)
    assert _compiled(rec) == compiled


@pytest.mark.slow  # kept out of CI: another test covers this path faster (run with -m slow)
def test_the_first_warmup_stage_answers_everything_without_a_compile(artifact):
    """Before the background warm-up compiled anything, every request is answered by the one-row
    shapes (a batch in chunks of one row), with the same answers as a fully compiled server."""
    rec = Recommender.load(artifact, max_batch=4, length_buckets=(2, 4))
    server = Server(rec, ServerConfig(max_batch_size=4))
    first, rest = server.warmup_plan()
    assert len(first) == 3 and len(rest) == 2 * 3 + 3 * 2
    server.warmup(first)
    rec.shapes.only_compiled = True
    compiled = _compiled(rec)
    assert compiled == (1, 1, 1)
    early = _requests_of_every_shape(rec, SessionStore(rec))
    assert _compiled(rec) == compiled
    server.warmup(rest)
    late = _requests_of_every_shape(rec, SessionStore(rec))
    for a, b in zip(early, late):
        for x, y in zip(a, b):
            if hasattr(x, "items"):
                assert x.items == y.items and x.scores == pytest.approx(y.scores, rel=1e-5, abs=1e-5)
            else:
                assert x.scores == pytest.approx(y.scores, rel=1e-5, abs=1e-5)


def test_writes_of_one_event_loop_step_leave_as_one():
    from cprec.serve.http import CoalescingTransport

    class Recording:
        def __init__(self):
            self.writes, self.closed = [], False

        def write(self, data):
            self.writes.append(data)

        def is_closing(self):
            return self.closed

        def close(self):
            self.closed = True

        def get_extra_info(self, name, default=None):
            return f"extra:{name}"

    async def go():
        raw = Recording()
        t = CoalescingTransport(raw, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"{}")
        before = list(raw.writes)
        await asyncio.sleep(0)  # the step ends: one flush
        after_step = list(raw.writes)
        t.write(b"last")
        t.close()  # flushes before closing
        t.write(b"dropped")
        await asyncio.sleep(0)
        return before, after_step, raw.writes, raw.closed, t.get_extra_info("peername")
    before, after_step, writes, closed, extra = asyncio.run(go())
    assert before == [] and after_step == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    assert writes == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"last"] and closed and extra == "extra:peername"


def _start_command(artifact, *args):
    """`python -m cprec.serve` on a free port: (process, url, its output up to "ready on")."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "cprec.serve", str(artifact), "--port", str(port), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while not any("ready on" in line for line in lines):
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError("".join(lines))
        lines.append(line)
    return proc, f"http://127.0.0.1:{port}", lines


@pytest.mark.slow
def test_the_command_serves_stops_cleanly_on_sigterm_and_keeps_its_sessions(artifact, tmp_path):
    sessions = tmp_path / "sessions"
    proc, url, lines = _start_command(artifact, "--max-batch-size", "4", "--batch-timeout-ms", "3000",
                                      "--session-dir", str(sessions))
    try:
        assert url in lines[-1] and "80 items" not in lines[0] and "79 items" in lines[0]
        before = _post(url, "/v1/sessions/kept/events", {"items": _raw([3, 9]), "n": 6}).json()
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(url, "/v1/recommend", {"history": ["movie-3"]})))
                   for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # one request computes at once, the others wait for their batch (3 s from the first)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert [r.status_code for r in results] == [200] * 4
        assert proc.wait(timeout=60) == 0 and (sessions / "sessions.npz").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, url, lines = _start_command(artifact, "--no-warmup", "--session-dir", str(sessions))
    try:
        assert "1 sessions loaded" in lines[0]
        after = _post(url, "/v1/sessions/kept/events", {"items": [], "n": 6}).json()
        assert after["session"] == "cached" and after["items"] == before["items"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_corrupt_session_file_is_a_one_line_error_and_stays(artifact, tmp_path):
    (tmp_path / "sessions.npz").write_bytes(b"not a session file")
    out = subprocess.run([sys.executable, "-m", "cprec.serve", str(artifact), "--session-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error:") and "session file" in out.stderr
    assert (tmp_path / "sessions.npz").read_bytes() == b"not a session file"


@pytest.mark.parametrize("widths", ["16,x", "0,4"])
def test_bad_length_buckets_are_a_one_line_error(artifact, widths):
    out = subprocess.run([sys.executable, "-m", "cprec.serve", str(artifact), "--length-buckets", widths],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error:") and "length" in out.stderr
