"""The HTTP recommendation server: Starlette on uvicorn, requests batched automatically.

    python -m cprec.serve exports/cprec-1m --port 8080 --max-batch-size 256 --batch-timeout-ms 2

Endpoints (JSON in and out, raw item ids as in the dataset):

- ``POST /v1/recommend`` ``{"history": [...], "n": 20, "exclude_seen": true, "max_clusters": null}``
  -> ``{"items", "scores", "exact", "unknown_items"}``; or ``{"histories": [[...], ...]}`` ->
  ``{"results": [...]}``.
- ``POST /v1/score`` ``{"history": [...], "candidates": [...]}`` -> ``{"scores", "unknown_items"}``
  (null for an unknown candidate).
- ``POST /v1/sessions/{id}/events`` ``{"items": [...], "n": 20, "history": [...]?, ...}``: appends
  to the user's cached session and returns fresh recommendations, with ``"session"``: "cached",
  "new" (no cached session: evicted, deleted, never seen or lost in a restart without
  ``--session-dir``; the state starts empty) or "rebuilt" (no cached session, so the optional
  ``history``, the events before these, was encoded first); ``DELETE /v1/sessions/{id}``.
- ``GET /healthz`` (200 once the first shapes are compiled; ``compiling``: how many more the
  background warm-up has left), ``GET /metrics`` (Prometheus text).

Every history of a request is one entry of a ``Batcher`` queue (``cprec/serve/batcher.py``): a
batch runs as one call of the ``Recommender`` on a worker thread, padded to a compiled shape
(``warmup_plan``), while the event loop fills the next one. Bad input is a 4xx with
``{"error": "..."}``; a failure while computing one request is a 500 for that request alone.
Session batches are transactional (``SessionStore.advance``): a failed one changes no session.
DELETE, /healthz and /metrics never wait on a computation. A request whose client disconnects
while it waits for its batch is dropped from the queue, never computed.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from cprec.serve.batcher import Batcher, ClientGone
from cprec.serve.http import JSON, parse_json
from cprec.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS_S, Counter, Gauge, Histogram, render
from cprec.serve.recommender import Recommender, RequestError, SessionStore, bucket


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    max_batch_size: int = 256
    batch_timeout_ms: float = 2.0
    sessions: int = 100_000  # cached sessions (LRU)
    session_bytes: int = 1 << 30
    max_history: int = 10_000  # items per history in a request
    max_candidates: int = 100_000
    max_batch_request: int = 1_024  # histories in one {"histories": [...]} request
    max_body_bytes: int = 4 << 20
    warmup: bool = True  # compile the first shapes before listening, the rest in the background (see warmup_plan)
    background_warmup: bool = True  # False: only the first shapes (tests)
    session_dir: str | None = None  # sessions saved there at shutdown (SESSIONS_FILE), loaded by the command


class BadRequest(Exception):
    """A request that cannot be served as sent: answered 4xx with its message."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# -- request parsing -------------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ids(body: dict, field: str, limit: int, allow_empty: bool = False) -> list:
    if field not in body:
        raise BadRequest(f"missing field {field!r}: give a list of item ids")
    value = body[field]
    if not isinstance(value, list):
        raise BadRequest(f"{field!r} must be a list of item ids, got {type(value).__name__}")
    if not value and not allow_empty:
        raise BadRequest(f"{field!r} is empty: give at least one item id")
    if len(value) > limit:
        raise BadRequest(f"{field!r} has {len(value):,} items; at most {limit:,} are accepted (send the most recent)",
                         413)
    bad = next((v for v in value if not (_is_int(v) or isinstance(v, str))), None)
    if bad is not None:
        raise BadRequest(f"{field!r} holds {bad!r} ({type(bad).__name__}); item ids are integers or strings")
    return value


def _options(body: dict, rec: Recommender) -> tuple[int, bool, int | None]:
    n = body.get("n", 20)
    if not _is_int(n) or not 1 <= n < rec.num_items:
        raise BadRequest(f"'n' must be an integer from 1 to {rec.num_items - 1} (the catalogue), got {n!r}")
    exclude = body.get("exclude_seen", True)
    if not isinstance(exclude, bool):
        raise BadRequest(f"'exclude_seen' must be true or false, got {exclude!r}")
    budget = body.get("max_clusters")
    if budget is not None and (not _is_int(budget) or budget < 0):
        raise BadRequest(f"'max_clusters' must be null or an integer >= 0, got {budget!r}")
    return n, exclude, budget


async def _json_object(request: Request, limit: int) -> dict:
    too_large = BadRequest(f"the body is larger than {limit:,} bytes: send fewer or shorter histories", 413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # refused before reading it
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = parse_json(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})", 400) from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}", 400)
    return body


def _recommendation(r, n: int) -> dict:
    """A Recommendation as JSON, its first n items (the batch ran at its largest n)."""
    out = {"items": r.items[:n], "scores": r.scores[:n], "exact": r.exact, "unknown_items": r.unknown_items}
    if r.session is not None:
        out["session"] = r.session
    return out


def _client_gone(request: Request) -> Callable[[], bool] | None:
    """Whether the request's client has disconnected, read from uvicorn's request cycle (its
    ``disconnected`` flag, set when the connection is lost); None under a server without one."""
    cycle = getattr(request.receive, "__self__", None)
    return (lambda: cycle.disconnected) if hasattr(cycle, "disconnected") else None


SESSIONS_FILE = "sessions.npz"
SCORE_CANDIDATES = 256  # candidates per /v1/score request compiled at start-up (more: compiled on first use)


# -- the application -------------------------------------------------------------------------------

class Server:
    """The model, its session store, batchers and metrics; ``app`` is the ASGI application."""

    def __init__(self, rec: Recommender, config: ServerConfig = ServerConfig()) -> None:
        self.rec, self.config = rec, config
        self.store = SessionStore(rec, max_entries=config.sessions, max_bytes=config.session_bytes)
        self.ready = False
        self.compiling = 0  # shapes of the warm-up not compiled yet (the background's)
        self.fail_items: set = set()  # fault injection (tests): a request holding one of these ids fails in its batch
        timeout = config.batch_timeout_ms / 1e3
        self.batch_sizes = Histogram("cprec_batch_size", "Requests per computed batch.", BATCH_BUCKETS, ("batcher",))
        self.batchers = {
            "recommend": Batcher(self._recommend_batch, config.max_batch_size, timeout, "recommend", self._observe_batch),
            "score": Batcher(self._score_batch, config.max_batch_size, timeout, "score", self._observe_batch),
            "sessions": Batcher(self._session_batch, config.max_batch_size, timeout, "sessions", self._observe_batch),
        }
        self.requests = Counter("cprec_requests_total", "HTTP requests by endpoint and status.", ("endpoint", "status"))
        self.errors = Counter("cprec_errors_total", "HTTP requests answered 4xx or 5xx.", ("endpoint", "status"))
        self.latency = Histogram("cprec_request_seconds", "Request latency.", LATENCY_BUCKETS_S, ("endpoint",))
        gauges = [
            Gauge("cprec_queue_depth", "Requests waiting for a batch.",
                  lambda: {(k,): b.depth for k, b in self.batchers.items()}, ("batcher",)),
            Gauge("cprec_sessions_cached", "Sessions in the store.", lambda: {(): len(self.store)}),
            Gauge("cprec_session_bytes", "Bytes of the cached sessions.", lambda: {(): self.store.nbytes}),
            Gauge("cprec_sessions_evicted", "Sessions evicted since start.", lambda: {(): self.store.evicted}),
            Gauge("cprec_ready", "1 once the first shapes are compiled (answering).", lambda: {(): float(self.ready)}),
            Gauge("cprec_compiling", "Shapes the background warm-up has left.", lambda: {(): float(self.compiling)}),
        ]
        self._metrics = [self.requests, self.errors, self.latency, self.batch_sizes, *gauges]
        routes = [
            Route("/v1/recommend", self._timed("recommend", self.recommend), methods=["POST"]),
            Route("/v1/score", self._timed("score", self.score), methods=["POST"]),
            Route("/v1/sessions/{user}/events", self._timed("session_events", self.session_events), methods=["POST"]),
            Route("/v1/sessions/{user}", self._timed("session_delete", self.session_delete), methods=["DELETE"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan, exception_handlers={HTTPException: self._http_error})

    # -- lifecycle --

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.save_error = None
        for b in self.batchers.values():
            b.start()
        first, rest = self.warmup_plan()
        self.compiling = len(first) + len(rest) * self.config.background_warmup if self.config.warmup else 0
        self._stopping = threading.Event()
        background = None
        if self.config.warmup:
            await asyncio.get_running_loop().run_in_executor(None, self.warmup, first)
            self.rec.shapes.only_compiled = True  # from now on no request waits on an avoidable compile
            if self.config.background_warmup:
                background = threading.Thread(target=self.warmup, args=(rest,), name="cprec-warmup", daemon=True)
        # Everything alive now (the item id maps, jax's traces and compiled executables) lives as
        # long as the server: move it out of reach of the cyclic collector, whose full passes over
        # it would otherwise stall every request in flight (docs/serving.md, "Tail latency").
        gc.collect()
        gc.freeze()
        self.ready = True
        if background is not None:
            background.start()
        try:
            yield
        finally:
            self._stopping.set()
            if background is not None:  # it stops after its current shape (not left running at exit)
                await asyncio.get_running_loop().run_in_executor(None, background.join)
            for b in self.batchers.values():
                await b.stop()  # every event in flight is committed first
            if self.config.session_dir:
                path = pathlib.Path(self.config.session_dir) / SESSIONS_FILE
                try:
                    count = self.store.save(path)
                    print(f"cprec.serve: saved {count:,} sessions to {path}", flush=True)
                except OSError as e:
                    self.save_error = f"cannot save the sessions to {path} ({e}); the previous file is unchanged"
                    print(f"error: {self.save_error}", file=sys.stderr, flush=True)

    def warmup_plan(self) -> tuple[list[tuple[str, tuple]], list[tuple[str, tuple]]]:
        """(shapes compiled before the server listens, the rest, compiled in the background, most
        useful first), as (kind, shape) for ``Recommender.compile_shape``.

        First: one row of each endpoint at the full history width (n up to 32, up to
        ``SCORE_CANDIDATES`` candidates): every request can be answered at once, a batch in chunks
        of one row. Then the batch buckets (powers of two) at the full width, then the narrower
        widths. While they compile, a call takes the cheapest compiled shape that holds it
        (``Shapes.fit``); a shape none holds (n above 32, more candidates, several events per
        session request) compiles on first use.
        """
        rec = self.rec
        sizes = sorted({bucket(b, largest=self.config.max_batch_size) for b in
                        (1 << k for k in range(self.config.max_batch_size.bit_length() + 1))})
        full, n_pad, m = rec.length_buckets[-1], rec._n_bucket(20), rec.candidate_width(SCORE_CANDIDATES)
        per_size = [[("recommend", (b, full, n_pad)), ("advance", (b, 1, n_pad)), ("score", (b, full, m))]
                    for b in sizes]
        narrow = [("recommend", (b, w, n_pad)) for b in sizes for w in rec.length_buckets[:-1]]
        return per_size[0], [*(x for group in per_size[1:] for x in group), *narrow]

    def warmup(self, shapes: list[tuple[str, tuple]] | None = None) -> None:
        """Compiles ``shapes`` (default: the whole ``warmup_plan``) one after another; stops early once
        the server stops."""
        if shapes is None:
            first, rest = self.warmup_plan()
            shapes = first + rest
        for kind, shape in shapes:
            if getattr(self, "_stopping", None) is not None and self._stopping.is_set():
                return
            self.rec.compile_shape(kind, shape)
            self.compiling = max(0, getattr(self, "compiling", 0) - 1)
        gc.freeze()  # what the compilations left is as long-lived as the rest (see _lifespan)

    # -- batch functions (worker threads) --

    def _observe_batch(self, name: str, size: int) -> None:
        self.batch_sizes.observe(size, name)

    def _check_injected_failure(self, history: Sequence) -> None:
        if self.fail_items and not self.fail_items.isdisjoint(history):
            raise RuntimeError("injected failure")

    def _recommend_batch(self, requests: list[tuple]) -> list:
        """One ``Recommender.recommend`` for the batch at its largest n, each answer cut to its own n."""
        for history, *_ in requests:
            self._check_injected_failure(history)
        histories, ns, excluding, budgets = zip(*requests)
        recs = self.rec.recommend(list(histories), max(ns), list(excluding), list(budgets))
        return [_recommendation(r, n) for r, n in zip(recs, ns)]

    def _score_batch(self, requests: list[tuple]) -> list:
        """One ``Recommender.score_many`` for the batch (one call per candidate width in it)."""
        for history, _ in requests:
            self._check_injected_failure(history)
        histories, candidates = zip(*requests)
        return [{"scores": s.scores, "unknown_items": s.unknown_items}
                for s in self.rec.score_many(list(histories), list(candidates))]

    def _session_batch(self, requests: list[tuple]) -> list:
        """One ``SessionStore.advance`` for the batch at its largest n, each answer cut to its own n."""
        for _, items, *_ in requests:
            self._check_injected_failure(items)
        users, items, ns, excluding, budgets, histories = zip(*requests)
        recs = self.store.advance(list(users), list(items), max(ns), list(excluding), list(budgets), list(histories))
        return [_recommendation(r, n) for r, n in zip(recs, ns)]

    # -- handlers --

    def _timed(self, endpoint: str, handler):
        async def wrapped(request: Request) -> Response:
            start = time.perf_counter()
            try:
                if not self.ready:
                    raise BadRequest("the server is starting: the model is being compiled; retry shortly", 503)
                response = await handler(request)
            except BadRequest as e:
                response = JSON({"error": str(e)}, status_code=e.status)
            except ClientGone:
                response = JSON({"error": "the client disconnected"}, status_code=499)
            except RequestError as e:
                response = JSON({"error": str(e)}, status_code=422)
            except HTTPException as e:
                response = await self._http_error(request, e)
            except Exception as e:  # the computation of this request failed; the server goes on
                response = JSON({"error": f"internal error while computing the request: {e}"}, status_code=500)
            status = str(response.status_code)
            self.requests.inc(endpoint, status)
            if response.status_code >= 400:
                self.errors.inc(endpoint, status)
            self.latency.observe(time.perf_counter() - start, endpoint)
            return response
        return wrapped

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        messages = {404: f"no endpoint {request.url.path}; see /v1/recommend, /v1/score, /v1/sessions/{{id}}/events",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        return JSON({"error": messages.get(exc.status_code, str(exc.detail))}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def recommend(self, request: Request) -> Response:
        body = await _json_object(request, self.config.max_body_bytes)
        n, exclude, budget = _options(body, self.rec)
        if "histories" in body:
            histories = body["histories"]
            if not isinstance(histories, list) or not histories:
                raise BadRequest("'histories' must be a non-empty list of histories (lists of item ids)")
            if len(histories) > self.config.max_batch_request:
                raise BadRequest(f"'histories' has {len(histories):,} histories; at most "
                                 f"{self.config.max_batch_request:,} per request", 413)
            parsed = [_ids({"history": h}, "history", self.config.max_history) for h in histories]
            batcher, gone = self.batchers["recommend"], _client_gone(request)
            results = await asyncio.gather(*(batcher.submit((h, n, exclude, budget), gone) for h in parsed))
            return JSON({"results": results})
        history = _ids(body, "history", self.config.max_history)
        return JSON(await self.batchers["recommend"].submit((history, n, exclude, budget), _client_gone(request)))

    async def score(self, request: Request) -> Response:
        body = await _json_object(request, self.config.max_body_bytes)
        history = _ids(body, "history", self.config.max_history)
        candidates = _ids(body, "candidates", self.config.max_candidates)
        return JSON(await self.batchers["score"].submit((history, candidates), _client_gone(request)))

    async def session_events(self, request: Request) -> Response:
        body = await _json_object(request, self.config.max_body_bytes)
        items = _ids(body, "items", self.config.max_history, allow_empty=True)
        history = _ids(body, "history", self.config.max_history, allow_empty=True) if "history" in body else None
        n, exclude, budget = _options(body, self.rec)
        user = request.path_params["user"]
        return JSON(await self.batchers["sessions"].submit((user, items, n, exclude, budget, history),
                                                           _client_gone(request)))

    async def session_delete(self, request: Request) -> Response:
        user = request.path_params["user"]
        if not self.store.delete(user):
            return JSON({"error": f"no cached session {user!r}"}, status_code=404)
        return JSON({"deleted": user})

    async def healthz(self, request: Request) -> Response:
        if not self.ready:
            return JSON({"status": "starting"}, status_code=503)
        return JSON({"status": "ok", "items": self.rec.num_items, "sessions": len(self.store),
                     "compiling": self.compiling})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(render(self._metrics), media_type="text/plain; version=0.0.4")
