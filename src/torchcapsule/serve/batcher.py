"""Dynamic batching on the event loop: group requests, run one batched call, answer each.

Policy (why it looks like this):
- Idle server: the first request is dispatched at once. Waiting `max_wait_ms` for company
  that is not coming would add the whole wait to every request at low load.
- Busy server: while a batch runs, new requests queue up; the next batch takes all of them
  (up to `max_batch_size`). Before dispatching, the batcher keeps yielding to the event loop
  while requests are still arriving (one more tick each time the queue grew), bounded by
  `max_wait_ms` from the first queued request, so batches fill under load without a timer.
- The queue is bounded: `submit` raises QueueFull at `max_queue` (the app answers 503 with
  Retry-After) instead of letting latency grow without limit. With inline forwards, the submit
  that fills the queue runs a batch at once: the sooner it runs, the sooner there is room.
- Each item has a deadline; a sweeper fails late items with TimeoutError (the app answers
  504), whether they are still queued or stuck in a batch.
- Items carry a key (the model version they were decoded for); a batch never mixes keys, so
  a hot reload never feeds a request to a model it was not validated against.
`process(key, payloads)` returns one result or Exception per payload; it runs inline on the
loop (small CPU models: no thread hand-off) or in one worker thread (`in_thread=True`).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class QueueFull(Exception):
    """The bounded queue is full; retry later."""


class Closed(Exception):
    """The batcher no longer takes requests (shutting down)."""


class _Item:
    __slots__ = ("key", "payload", "future", "deadline")

    def __init__(self, key: Any, payload: Any, future: asyncio.Future, deadline: float) -> None:
        self.key = key
        self.payload = payload
        self.future = future
        self.deadline = deadline


Process = Callable[[Any, list], Sequence[Any]]


class Batcher:
    def __init__(self, process: Process, *, max_batch_size: int = 32, max_wait_ms: float = 2.0,
                 max_queue: int = 256, timeout_s: float = 10.0, in_thread: bool = False,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or timeout_s <= 0 or max_wait_ms < 0:
            raise ValueError("max_batch_size, max_queue >= 1; timeout_s > 0; max_wait_ms >= 0")
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout = timeout_s
        self.on_batch = on_batch
        self._full = min(max_batch_size, max_queue)  # no use waiting for more than this
        self._queue: deque[_Item] = deque()
        self._running: list[_Item] = []
        self._wake: asyncio.Future | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="capsule-batch") if in_thread else None
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [self._loop.create_task(self._run(), name="capsule-batcher"),
                       self._loop.create_task(self._sweep(), name="capsule-sweeper")]

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Take no new items, finish the queued and running ones, then stop."""
        self._closed = True
        end = time.monotonic() + (self.timeout if drain_timeout is None else drain_timeout)
        while (self._queue or self._running) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        for t in self._tasks:
            t.cancel()
        for item in list(self._queue):
            if not item.future.done():
                item.future.set_exception(Closed("server shutting down"))
        self._queue.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ submit
    def submit(self, key: Any, payload: Any) -> asyncio.Future:
        """Queue one payload; await the returned future for its result."""
        if self._closed:
            raise Closed("server shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"queue full ({self.max_queue} requests waiting)")
        loop = self._loop
        fut = loop.create_future()
        queue = self._queue
        queue.append(_Item(key, payload, fut, loop.time() + self.timeout))
        if len(queue) >= self.max_queue and self._executor is None and not self._running:
            # A full queue refuses new requests: run a batch now, inline as the batcher would,
            # rather than a loop iteration or more later. Under overload every iteration also
            # reads and refuses the other connections, so iterations per batch set the goodput.
            batch = self._take()
            if batch:  # empty if every queued item expired meanwhile
                self._run_inline(batch)
            return fut
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        return fut

    # ------------------------------------------------------------------ worker
    async def _run(self) -> None:
        loop = self._loop
        queue = self._queue
        while True:
            if not queue:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
            if self.max_wait > 0 and len(queue) < self._full:
                # Keep collecting only while requests keep arriving (see module docstring).
                first = queue[0].deadline - self.timeout if queue else loop.time()
                n = len(queue)
                while True:
                    await asyncio.sleep(0)
                    m = len(queue)
                    if m == n or m >= self._full or loop.time() - first >= self.max_wait:
                        break
                    n = m
            batch = self._take()
            if not batch:
                continue
            if self._executor is None:
                self._run_inline(batch)
                continue
            self._running = batch
            try:
                results = await loop.run_in_executor(self._executor, self.process, batch[0].key,
                                                     [i.payload for i in batch])
            except Exception as e:  # process() should return exceptions; this is the safety net
                results = [e] * len(batch)
            finally:
                self._running = []
            self._answer(batch, results)

    def _run_inline(self, batch: list[_Item]) -> None:
        self._running = batch
        try:
            results = self.process(batch[0].key, [i.payload for i in batch])
        except Exception as e:  # process() should return exceptions; this is the safety net
            results = [e] * len(batch)
        finally:
            self._running = []
        self._answer(batch, results)

    def _answer(self, batch: list[_Item], results: Sequence[Any]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        for item, res in zip(batch, results):
            fut = item.future
            if fut.done():  # timed out or cancelled meanwhile
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def _take(self) -> list[_Item]:
        queue = self._queue
        batch: list[_Item] = []
        key = None
        now = self._loop.time()
        while queue and len(batch) < self.max_batch_size:
            item = queue[0]
            if item.future.done():  # expired while queued
                queue.popleft()
                continue
            if item.deadline <= now:  # the sweeper may not have run while a forward held the loop
                queue.popleft()
                item.future.set_exception(TimeoutError(f"no answer within {self.timeout:g} s"))
                continue
            if batch and item.key is not key:
                break
            key = item.key
            batch.append(queue.popleft())
        return batch

    async def _sweep(self) -> None:
        loop = self._loop
        period = min(0.1, self.timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            expired = False
            for item in self._running:
                if item.deadline <= now and not item.future.done():
                    item.future.set_exception(TimeoutError(f"no answer within {self.timeout:g} s"))
            for item in self._queue:
                if item.deadline <= now:
                    expired = True
                    if not item.future.done():
                        item.future.set_exception(TimeoutError(f"no answer within {self.timeout:g} s"))
            if expired:  # in place: _run holds a reference to this deque
                keep = [i for i in self._queue if not i.future.done()]
                self._queue.clear()
                self._queue.extend(keep)
