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
from cprec.serve.recommender import Recommender
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
    assert session.seen == set(range(1, 9))


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


def test_a_client_that_disconnects_costs_nothing_else(served):
    running, _ = served
    with pytest.raises(httpx.TimeoutException):  # the batch waits 20 ms: the client gives up first
        httpx.post(running.url + "/v1/recommend", json={"history": ["movie-2"]}, timeout=0.001)
    assert _post(running.url, "/v1/recommend", {"history": ["movie-2"]}).status_code == 200


def test_queue_depth_counts_the_batch_being_collected():
    async def go():
        from cprec.serve.batcher import Batcher

        batcher = Batcher(lambda reqs: [r * 2 for r in reqs], max_batch_size=10, timeout_s=0.3, name="t")
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0.1)  # the collector holds all three, waiting for more or the timeout
        depth_while_collecting = batcher.depth
        results = await asyncio.gather(*tasks)
        depth_after = batcher.depth
        await batcher.stop()
        return depth_while_collecting, results, depth_after
    assert asyncio.run(go()) == (3, [0, 2, 4], 0)


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


def test_warmup_compiles_every_batch_size_and_history_width(artifact):
    """After the warm-up no request of the default shape compiles: any batch size up to the
    maximum, any history length (each length bucket), and session events."""
    rec = Recommender.load(artifact, max_batch=4, length_buckets=(2, 4))
    server = Server(rec, ServerConfig(max_batch_size=4))
    server.warmup()
    compiled = rec._recommend_fn._cache_size(), rec._append_top_fn._cache_size()
    assert compiled == (3 * 3, 3)  # batch buckets 1, 2, 4 x widths 2, 4, L; events at batch 1, 2, 4
    for rows in (1, 2, 3, 4):
        for length in (1, 3, 7, 50):
            rec.recommend([_raw(range(1, length + 1))] * rows, n=20)
        server.store.advance([f"u{r}" for r in range(rows)], [["movie-3"]] * rows, n=20)
    assert (rec._recommend_fn._cache_size(), rec._append_top_fn._cache_size()) == compiled


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


def test_the_command_serves_and_stops_cleanly_on_sigterm(artifact, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "cprec.serve", str(artifact), "--port", str(port),
                             "--max-batch-size", "4", "--batch-timeout-ms", "3000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("ready on" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert f"http://127.0.0.1:{port}" in lines[-1] and "80 items" not in lines[0] and "79 items" in lines[0]
        url = f"http://127.0.0.1:{port}"
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(url, "/v1/recommend", {"history": ["movie-3"]})))
                   for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the requests reach the server and wait for their batch (3 s from the first)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("widths", ["16,x", "0,4"])
def test_bad_length_buckets_are_a_one_line_error(artifact, widths):
    out = subprocess.run([sys.executable, "-m", "cprec.serve", str(artifact), "--length-buckets", widths],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error:") and "length" in out.stderr
