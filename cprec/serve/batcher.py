"""Automatic request batching for an asyncio server (TF Serving's / Triton's dynamic batcher).

    batcher = Batcher(run_batch, max_batch_size=256, timeout_s=0.002, name="recommend")
    result = await batcher.submit(request)          # from any number of concurrent handlers

Requests wait in a queue until ``max_batch_size`` of them are there or ``timeout_s`` has passed
since the first one arrived (its arrival, not when the worker got free: requests that queued up
while the last batch computed have waited already, so the worker goes on at once); the batch then
runs as ``run_batch(list of requests)`` on a worker thread (never on the event loop, so the loop
keeps accepting and queueing the next batch while the model computes). ``run_batch`` returns one
result per request; an exception for one request (an ``Exception`` instance in its place) fails
that request alone. If ``run_batch`` raises, each request of the batch is retried alone, so one
bad request never fails the others.

One worker thread per batcher: batches of one kind run one after another (the model's compute
uses every core anyway), while the event loop fills the next batch.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from typing import Any


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

    async def submit(self, request: Any) -> Any:
        """The result of `request`, computed in some batch; raises what computing it raised."""
        if self._queue is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        future = asyncio.get_running_loop().create_future()
        self._waiting += 1
        await self._queue.put((request, future, time.perf_counter()))
        return await future

    async def _collect(self) -> list[tuple[Any, asyncio.Future, float]]:
        batch = [await self._queue.get()]
        deadline = batch[0][2] + self.timeout_s  # from the first request's arrival
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
            live = [(r, f) for r, f, _ in batch if not f.cancelled()]  # a client that left costs nothing
            try:
                if live:
                    results = await loop.run_in_executor(self._executor, self._run_isolated, [r for r, _ in live])
                    for (_, future), result in zip(live, results):
                        if future.cancelled():
                            continue
                        if isinstance(result, BaseException):
                            future.set_exception(result)
                        else:
                            future.set_result(result)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _run_isolated(self, requests: list[Any]) -> list[Any]:
        if self.on_batch is not None:
            self.on_batch(self.name, len(requests))
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
