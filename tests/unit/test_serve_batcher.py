"""The batcher's policy, driven on a real event loop with a fake `process` (pure logic)."""
from __future__ import annotations

import asyncio
import time

import pytest

from torchcapsule.serve.batcher import Batcher, Closed, QueueFull


def run(coro):
    return asyncio.run(coro)


class Recorder:
    def __init__(self, delay: float = 0.0, fail_on=None):
        self.batches: list[tuple] = []
        self.delay = delay
        self.fail_on = fail_on

    def __call__(self, key, payloads):
        self.batches.append((key, list(payloads)))
        if self.delay:
            time.sleep(self.delay)
        return [ValueError(p) if p == self.fail_on else p * 10 for p in payloads]


def test_idle_request_is_dispatched_without_waiting_max_wait():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_wait_ms=500)
        b.start()
        t0 = time.perf_counter()
        assert await b.submit("v1", 1) == 10
        took = time.perf_counter() - t0
        await b.stop()
        return took, rec.batches

    took, batches = run(main())
    assert took < 0.05, f"an idle request waited {took * 1000:.0f} ms (max_wait is 500 ms)"
    assert batches == [("v1", [1])]


def test_the_submit_that_fills_the_queue_runs_a_batch_at_once():
    """Inline forwards: the submit that fills the queue runs a batch at once instead of waking
    the batcher a loop iteration or more later (under overload, iterations are what a flood of
    refused connections makes slow)."""
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=32, max_queue=3, max_wait_ms=50)
        b.start()
        futs = [b.submit("v1", i) for i in range(3)]
        done = [f.done() for f in futs]  # no await yet: only the third submit can have run it
        assert await asyncio.gather(*futs) == [0, 10, 20]
        await b.stop()
        return done, rec.batches

    done, batches = run(main())
    assert done == [True, True, True] and batches == [("v1", [0, 1, 2])]


def test_requests_arriving_together_share_a_batch_up_to_max_size():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=4, max_wait_ms=50)
        b.start()
        futs = [b.submit("v1", i) for i in range(10)]
        results = await asyncio.gather(*futs)
        await b.stop()
        return results, rec.batches

    results, batches = run(main())
    assert results == [i * 10 for i in range(10)]
    assert [len(p) for _, p in batches] == [4, 4, 2]
    assert [x for _, p in batches for x in p] == list(range(10))  # FIFO


def test_requests_arriving_while_a_batch_runs_form_the_next_batch():
    async def main():
        rec = Recorder(delay=0.05)
        b = Batcher(rec, max_batch_size=32, max_wait_ms=0, in_thread=True)
        b.start()
        first = b.submit("v", 0)
        await asyncio.sleep(0.01)  # batch [0] is running in the thread
        rest = [b.submit("v", i) for i in range(1, 6)]
        await asyncio.gather(first, *rest)
        await b.stop()
        return rec.batches

    batches = run(main())
    assert [p for _, p in batches] == [[0], [1, 2, 3, 4, 5]]


def test_a_batch_never_mixes_model_versions():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=8)
        b.start()
        futs = [b.submit("old", 1), b.submit("old", 2), b.submit("new", 3), b.submit("new", 4)]
        await asyncio.gather(*futs)
        await b.stop()
        return rec.batches

    assert run(main()) == [("old", [1, 2]), ("new", [3, 4])]


def test_full_queue_raises_queue_full():
    async def main():
        b = Batcher(Recorder(delay=0.05), max_batch_size=1, max_queue=2, in_thread=True)
        b.start()
        ok = [b.submit("v", 1), b.submit("v", 2)]
        with pytest.raises(QueueFull):
            b.submit("v", 3)
        await asyncio.gather(*ok)
        b.submit("v", 4)  # room again once the queue drained
        await b.stop()

    run(main())


def test_late_requests_fail_with_timeout_even_if_queued_behind_a_long_batch():
    async def main():
        b = Batcher(Recorder(delay=0.3), max_batch_size=1, timeout_s=0.2)  # inline: blocks the loop
        b.start()
        futs = [b.submit("v", i) for i in range(3)]
        out = await asyncio.gather(*futs, return_exceptions=True)
        await b.stop()
        return out

    out = run(main())
    assert out[0] == 0
    assert all(isinstance(e, TimeoutError) for e in out[1:])


def test_timeout_reaches_a_request_stuck_in_a_threaded_batch():
    async def main():
        b = Batcher(Recorder(delay=0.5), max_batch_size=1, timeout_s=0.15, in_thread=True)
        b.start()
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            await b.submit("v", 1)
        took = time.perf_counter() - t0
        await b.stop(drain_timeout=1)
        return took

    assert run(main()) < 0.45


def test_process_errors_go_to_their_own_request_only():
    async def main():
        b = Batcher(Recorder(fail_on=2), max_batch_size=8)
        b.start()
        out = await asyncio.gather(*(b.submit("v", i) for i in range(4)), return_exceptions=True)
        await b.stop()
        return out

    out = run(main())
    assert out[0] == 0 and out[1] == 10 and isinstance(out[2], ValueError) and out[3] == 30


def test_stop_drains_then_refuses():
    async def main():
        rec = Recorder(delay=0.02)
        b = Batcher(rec, max_batch_size=2, in_thread=True)
        b.start()
        futs = [b.submit("v", i) for i in range(5)]
        await b.stop()
        assert all(f.done() and f.result() == i * 10 for i, f in enumerate(futs))
        with pytest.raises(Closed):
            b.submit("v", 9)

    run(main())


def test_max_wait_bounds_collection_while_requests_keep_arriving():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=1000, max_wait_ms=30, max_queue=10**6)
        b.start()
        futs = []
        t_end = time.perf_counter() + 0.2
        while time.perf_counter() < t_end:  # a steady stream: one request per loop tick
            futs.append(b.submit("v", len(futs)))
            await asyncio.sleep(0)
        await asyncio.gather(*futs)
        await b.stop()
        return rec.batches, len(futs)

    batches, n = run(main())
    assert sum(len(p) for _, p in batches) == n
    assert len(batches) >= 4, "a continuous stream must not be held past max_wait_ms"
    assert max(len(p) for _, p in batches) > 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Batcher(Recorder(), max_batch_size=0)
