"""Automatic request batching for an asyncio server (TF Serving's / Triton's dynamic batcher).

    batcher = Batcher(run_batch, max_batch_size=256, timeout_s=0.002, name="recommend")
    result = await batcher.submit(request)          # from any number of concurrent handlers

A request that finds the worker idle (nothing computing, nothing queued) on a quiet server (the
last batch held one request, or ended more than ``timeout_s`` ago) is computed at once, with
whatever arrived in the same event-loop step: batching costs a quiet server no latency. Right
after a batch of several requests, concurrent clients are answering and sending again, so a
request that finds the worker idle then waits for them up to ``timeout_s`` (without it, under
load, each batch would split into a lone first request and the rest).
Requests that arrive while a batch computes queue up and form the next batch (up to
``max_batch_size``); ``timeout_s`` only bounds how long such a partial batch waits for more,
counted from its first request's arrival, so after a computation longer than it the next batch
goes at once. A batch runs as ``run_batch(list of requests)`` on a worker thread (never on the
event loop, so the loop keeps accepting and queueing the next batch while the model computes).
``run_batch`` returns one result per request; an exception for one request (an ``Exception``
instance in its place) fails that request alone. If ``run_batch`` raises, each request of the
batch is retried alone, so one bad request never fails the others. Any other exception while
handling a batch (e.g. in ``on_batch``) fails that batch's requests, and the batcher goes on with
the next one: it never stops serving. A request cancelled before its batch is formed, or whose
``gone()`` (given to ``submit``: its client disconnected) is true then, is left out of it, never
computed (the latter fails with ``ClientGone``).

One worker thread per batcher: batches of one kind run one after another (the model's compute
uses every core anyway), while the event loop fills the next batch.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from typing import Any


class ClientGone(Exception):
    """The request's client disconnected before its batch was formed: it was not computed."""


class Batcher:
    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 256,
                 timeout_s: float = 0.002, name: str = "batch",
                 on_batch: Callable[[str, int], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.run_batch, self.max_batch_size, self.timeout_s, self.name = run_batch, max_batch_size, timeout_s, name
        self.on_batch = on_batch  # called with (name, batch size) for every batch run (metrics)
        self._queue: asyncio.Queue | None = None
        self._waiting = 0  # submitted and not yet handed to the worker (queued or in the batch being collected)
        self.computed = 0  # requests handed to run_batch since start (tests, metrics)
        self._busy = False  # a batch is computing
        self._last_size, self._last_end = 0, 0.0  # the last computed batch: requests, when it ended
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cprec-{name}")

    @property
    def depth(self) -> int:
        """Requests waiting for a batch: queued, or in the batch being collected (not yet computing)."""
        return self._waiting

    def start(self) -> None:
        """Starts the collecting task on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"cprec-batcher-{self.name}")

    async def stop(self) -> None:
        """Runs what is queued, then stops."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, request: Any, gone: Callable[[], bool] | None = None) -> Any:
        """The result of `request`, computed in some batch; raises what computing it raised.
        ``gone``: tells whether the client has left (checked as the batch forms, no task per request)."""
        if self._queue is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        future = asyncio.get_running_loop().create_future()
        now = time.perf_counter()
        quiet = self._last_size <= 1 or now - self._last_end > self.timeout_s
        idle = quiet and not self._busy and self._waiting == 0  # nothing computing, nothing queued
        self._waiting += 1
        self._queue.put_nowait((request, future, now, idle, gone))
        return await future

    async def _collect(self) -> list[tuple[Any, asyncio.Future, float, bool, Callable | None]]:
        batch = [await self._queue.get()]
        # A request that found the worker idle on a quiet server goes at once with what is there;
        # any other batch may wait for more until the timeout from its first request's arrival.
        _, _, arrival, idle, _ = batch[0]
        deadline = arrival + (0.0 if idle else self.timeout_s)
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._waiting -= len(batch)
            for _, f, _, _, gone in batch:  # a request whose client left is not computed
                if gone is not None and not f.done() and gone():
                    f.set_exception(ClientGone("the client disconnected before its batch was formed"))
            live = [(r, f) for r, f, *_ in batch if not f.done()]
            try:
                if live:
                    self.computed += len(live)
                    self._busy = True
                    try:
                        results = await loop.run_in_executor(self._executor, self._run_isolated, [r for r, _ in live])
                    finally:
                        self._busy = False
                        self._last_size, self._last_end = len(live), time.perf_counter()
                    for (_, future), result in zip(live, results):
                        if future.done():
                            continue
                        if isinstance(result, BaseException):
                            future.set_exception(result)
                        else:
                            future.set_result(result)
            except Exception as e:  # outside run_batch's own isolation: this batch fails, the batcher goes on
                for _, future in live:
                    if not future.done():
                        future.set_exception(e)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _run_isolated(self, requests: list[Any]) -> list[Any]:
        if self.on_batch is not None:
            self.on_batch(self.name, len(requests))  # an exception here fails the batch (see _loop)
        try:
            results = list(self.run_batch(requests))
            if len(results) != len(requests):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(requests)} requests")
            return results
        except Exception as batch_error:  # one bad request must not fail the others: retry each alone
            if len(requests) == 1:
                return [batch_error]
            out = []
            for r in requests:
                try:
                    out.append(self.run_batch([r])[0])
                except Exception as e:
                    out.append(e)
            return out
