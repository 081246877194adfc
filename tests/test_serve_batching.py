"""DynamicBatcher on its own: merging, grouping per adapter, token budget, delay, admission, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
from peft_export.serve.batching import DynamicBatcher  # noqa: E402


class RecordingEncoder:
    """encode_batch that returns [len(text), group id] per text and records each call."""

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None):
        self.calls: list[tuple[object, list[str]]] = []
        self.gate = gate
        self.fail_on = fail_on

    def __call__(self, group, texts):
        self.calls.append((group, list(texts)))
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.fail_on in texts:
            raise RuntimeError("model exploded")
        return np.array([[len(t), hash(group) % 1000] for t in texts], dtype=np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def make(encoder, **kw) -> DynamicBatcher:
    options = dict(max_batch_tokens=100, max_delay_s=0.005, max_concurrent_inputs=1000)
    options.update(kw)
    return DynamicBatcher(encoder, **options)


def test_concurrent_requests_are_merged_and_split_back_in_order():
    encoder = RecordingEncoder()

    async def main():
        batcher = make(encoder, max_delay_s=0.05)
        batcher.start()
        jobs = [batcher.try_submit("base", [f"r{r}-{i}" * (r + 1) for i in range(3)], [2, 2, 2]) for r in range(4)]
        results = await asyncio.gather(*(job.future for job in jobs))
        await batcher.stop()
        return jobs, results

    jobs, results = run(main())
    assert len(encoder.calls) == 1, encoder.calls  # 4 requests x 3 inputs, 24 tokens: one model call
    for job, result in zip(jobs, results):
        assert result[:, 0].tolist() == [len(t) for t in job.texts]


def test_inputs_are_grouped_per_adapter_never_mixed():
    encoder = RecordingEncoder()

    async def main():
        batcher = make(encoder, max_delay_s=0.05)
        batcher.start()
        groups = [("alpha", None), (None, None), ("beta", None), ("alpha", None), (None, None)]
        jobs = [batcher.try_submit(g, [f"{g[0]}-{i}"], [3]) for i, g in enumerate(groups)]
        results = await asyncio.gather(*(job.future for job in jobs))
        await batcher.stop()
        return groups, results

    groups, results = run(main())
    assert sorted(len(texts) for _, texts in encoder.calls) == [1, 2, 2]
    for group, texts in encoder.calls:
        assert all(t.startswith(f"{group[0]}-") for t in texts)
    for group, result in zip(groups, results):
        assert result[0, 1] == hash(group) % 1000


def test_token_budget_splits_batches_and_a_big_request_spans_several():
    encoder = RecordingEncoder()

    async def main():
        batcher = make(encoder, max_batch_tokens=10)
        batcher.start()
        job = batcher.try_submit("g", [f"t{i}" for i in range(7)], [4] * 7)  # 28 tokens, budget 10
        single = batcher.try_submit("g", ["x" * 50], [50])  # over budget alone: still runs, by itself
        result = await job.future
        await single.future
        await batcher.stop()
        return result

    result = run(main())
    sizes = [len(texts) for _, texts in encoder.calls]
    assert sizes == [2, 2, 2, 1, 1], sizes
    assert result[:, 0].tolist() == [2.0] * 7


def test_a_lone_request_waits_at_most_the_delay():
    encoder = RecordingEncoder()

    async def main():
        batcher = make(encoder, max_delay_s=0.05, max_batch_tokens=10_000)
        batcher.start()
        started = time.perf_counter()
        await batcher.try_submit("g", ["alone"], [3]).future
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    elapsed = run(main())
    assert 0.04 <= elapsed < 0.5, elapsed


def test_full_budget_does_not_wait_for_the_delay():
    encoder = RecordingEncoder()

    async def main():
        batcher = make(encoder, max_delay_s=5.0, max_batch_tokens=10)
        batcher.start()
        started = time.perf_counter()
        await batcher.try_submit("g", ["a", "b"], [5, 5]).future
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert run(main()) < 1.0


def test_admission_limit_counts_inputs_in_flight_and_cancel_frees_them():
    gate = threading.Event()
    encoder = RecordingEncoder(gate=gate)

    async def main():
        batcher = make(encoder, max_concurrent_inputs=5, max_delay_s=0.0, max_batch_tokens=2)
        batcher.start()
        running = batcher.try_submit("g", ["a"], [2])  # taken by the model thread, blocked on the gate
        while not encoder.calls:
            await asyncio.sleep(0.001)
        queued = batcher.try_submit("g", ["b", "c", "d"], [2, 2, 2])
        assert batcher.inflight_inputs == 4
        assert batcher.try_submit("g", ["e", "f"], [1, 1]) is None  # 4 + 2 > 5
        assert batcher.queued_inputs() == 3
        batcher.cancel(queued)
        assert batcher.inflight_inputs == 1 and batcher.queued_inputs() == 0
        accepted = batcher.try_submit("g", ["e", "f"], [1, 1])
        assert accepted is not None
        gate.set()
        await running.future
        await accepted.future
        await batcher.stop()
        assert batcher.inflight_inputs == 0
        return queued

    queued = run(main())
    assert queued.future.cancelled()
    assert all("b" not in texts for _, texts in encoder.calls)  # dropped inputs never reach the model


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    encoder = RecordingEncoder(fail_on="boom")

    async def main():
        batcher = make(encoder, max_delay_s=0.0, max_batch_tokens=1)
        batcher.start()
        bad = batcher.try_submit("g", ["boom"], [1])
        with pytest.raises(RuntimeError, match="model exploded"):
            await bad.future
        good = await batcher.try_submit("g", ["fine"], [1]).future
        await batcher.stop()
        return good, batcher.inflight_inputs

    good, inflight = run(main())
    assert good[0, 0] == 4 and inflight == 0


def test_stop_finishes_queued_work_first():
    encoder = RecordingEncoder()

    async def main():
        batcher = make(encoder, max_delay_s=0.02)
        batcher.start()
        job = batcher.try_submit("g", ["last"], [1])
        await batcher.stop()
        return job

    job = run(main())
    assert job.future.done() and job.future.result()[0, 0] == 4


def test_groups_take_turns_so_a_short_request_skips_another_groups_backlog():
    """FIFO across groups made one input of group B wait for every batch of group A queued before it."""
    gate = threading.Event()
    encoder = RecordingEncoder(gate=gate)

    async def main():
        batcher = make(encoder, max_delay_s=0.0, max_batch_tokens=8)
        batcher.start()
        blocker = batcher.try_submit("A", ["hold"], [1])
        while not encoder.calls:
            await asyncio.sleep(0.001)
        bulk = [batcher.try_submit("A", [f"a{r}-{i}" for i in range(8)], [4] * 8) for r in range(3)]  # 12 batches
        probe = batcher.try_submit("B", ["b"], [1])
        gate.set()
        await asyncio.gather(blocker.future, probe.future, *(job.future for job in bulk))
        await batcher.stop()

    run(main())
    groups = [group for group, _ in encoder.calls[1:]]
    assert groups.index("B") == 0, groups  # right after the running batch of A, not after 12 more of them
    assert sum(len(texts) for group, texts in encoder.calls[1:] if group == "A") == 24


def test_inside_a_group_each_waiting_request_gets_a_seat_in_the_next_batch():
    gate = threading.Event()
    encoder = RecordingEncoder(gate=gate)

    async def main():
        batcher = make(encoder, max_delay_s=0.0, max_batch_tokens=8)
        batcher.start()
        blocker = batcher.try_submit("g", ["hold"], [1])
        while not encoder.calls:
            await asyncio.sleep(0.001)
        bulk = batcher.try_submit("g", [f"bulk{i}" for i in range(10)], [2] * 10)
        short = batcher.try_submit("g", ["short"], [2])
        gate.set()
        results = await asyncio.gather(blocker.future, bulk.future, short.future)
        await batcher.stop()
        return results

    _, bulk_result, short_result = run(main())
    first = encoder.calls[1][1]
    assert "short" in first and len(first) == 4, encoder.calls  # 8 tokens: three bulk inputs and the short one
    assert bulk_result[:, 0].tolist() == [len(f"bulk{i}") for i in range(10)]  # split back in request order
    assert short_result[0, 0] == len("short")


def test_admission_counts_tokens_in_flight_too():
    gate = threading.Event()
    encoder = RecordingEncoder(gate=gate)

    async def main():
        batcher = make(encoder, max_delay_s=0.0, max_concurrent_tokens=100)
        batcher.start()
        first = batcher.try_submit("g", ["a", "b"], [30, 30])
        assert batcher.inflight_tokens == 60
        assert batcher.try_submit("g", ["c"], [50]) is None  # 60 + 50 > 100, though only 3 inputs
        second = batcher.try_submit("g", ["d"], [40])
        assert second is not None and batcher.inflight_tokens == 100
        batcher.cancel(second)
        assert batcher.inflight_tokens == 60
        gate.set()
        await first.future
        alone = batcher.try_submit("g", ["huge"], [500])  # over the budget, but nothing else is in flight
        assert alone is not None
        await alone.future
        await batcher.stop()
        assert batcher.inflight_tokens == 0

    run(main())


class WrongShapeEncoder:
    """encode_batch that returns ``bad(texts)`` for a batch holding "bad", else one row per text."""

    def __init__(self, bad):
        self.bad = bad

    def __call__(self, group, texts):
        if "bad" in texts:
            return self.bad(texts)
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


@pytest.mark.parametrize(("bad", "message"), [
    (lambda texts: np.ones(len(texts), np.float32), r"shape \(2,\) for 2 inputs; expected \(2, width\)"),
    (lambda texts: np.ones((len(texts) + 1, 2), np.float32), r"shape \(3, 2\) for 2 inputs"),
    (lambda texts: np.ones((len(texts), 2, 2), np.float32), r"shape \(2, 2, 2\) for 2 inputs"),
    (lambda texts: [[1.0], [1.0, 2.0]], r"list that is not an \(inputs, width\) array of numbers for 2 inputs"),
    (lambda texts: None, r"shape \(\) for 2 inputs"),
])
def test_results_of_the_wrong_shape_fail_their_requests_and_the_worker_goes_on(bad, message):
    """A batch call returning anything but one row per input fails that batch's requests with a message saying
    what came back; the worker lives on and the next request is answered (it used to die, leaving every later
    request waiting forever)."""

    async def main():
        batcher = make(WrongShapeEncoder(bad), max_delay_s=0.05)
        batcher.start()
        broken = batcher.try_submit("g", ["bad", "also"], [1, 1])
        with pytest.raises(RuntimeError, match=message):
            await broken.future
        good = await batcher.try_submit("g", ["fine"], [1]).future
        await batcher.stop()
        return good, batcher.inflight_inputs, batcher.inflight_tokens

    good, inputs, tokens = run(main())
    assert good.tolist() == [[4.0, 1.0]] and inputs == 0 and tokens == 0


def test_a_request_whose_batches_disagree_on_the_width_fails_alone():
    """Rows of one request that come back from two model calls with different widths fail that request only."""
    widths = iter([2, 3, 2])

    def encoder(group, texts):
        return np.ones((len(texts), next(widths)), np.float32)

    async def main():
        batcher = make(encoder, max_delay_s=0.0, max_batch_tokens=1)
        batcher.start()
        split = batcher.try_submit("g", ["one", "two"], [1, 1])  # two batches of one input each
        with pytest.raises(RuntimeError, match=r"row of shape \(3,\) for input 1 of a request whose earlier rows "
                                               r"have shape \(2,\)"):
            await split.future
        good = await batcher.try_submit("g", ["fine"], [1]).future
        await batcher.stop()
        return good, batcher.inflight_inputs

    good, inflight = run(main())
    assert good.shape == (1, 2) and inflight == 0


def test_a_failing_metrics_observer_costs_no_results():
    def observer(group, n, tokens, seconds):
        raise ValueError("metrics broke")

    async def main():
        batcher = make(RecordingEncoder(), on_batch=observer)
        batcher.start()
        first = await batcher.try_submit("g", ["one"], [1]).future
        second = await batcher.try_submit("g", ["three"], [1]).future
        await batcher.stop()
        return first, second

    first, second = run(main())
    assert first[0, 0] == 3 and second[0, 0] == 5
