"""Dynamic batching: inputs of concurrent requests are merged into model calls and the results split back.

Each request becomes an ``EmbedJob`` whose inputs wait in a queue of their *group* (adapter + prompt: the
settings a model call shares). One worker task forms batches and runs the model in a dedicated thread, so the
event loop keeps accepting, parsing and answering requests while ONNX Runtime computes.

Scheduling is fair, so that a short request never waits behind another tenant's bulk load:

* across groups, least recently served first: after a batch of group A, every other group with queued work
  (including one whose first request arrived while A's batch ran) gets a batch before A gets its next one
  (first-in-first-out made a one-sentence request to adapter B wait for every batch of three 160-input requests
  to adapter A that came first);
* inside a group, a batch takes one input from each waiting request in turn until ``max_batch_tokens`` is
  reached (always at least one input), so a one-input request rides in the next batch instead of after every
  input of the requests before it. A request larger than the budget is spread over several batches.

Before a batch runs, the worker waits at most ``max_delay_s`` from its group's oldest input for more company.

Admission bounds work, not only inputs: ``try_submit`` refuses (returns None) when accepting the request would
put more than ``max_concurrent_inputs`` inputs, or more than ``max_concurrent_tokens`` tokens, in flight (a
request bigger than the token budget is still accepted when nothing else is in flight). ``cancel`` drops a job's
inputs that have not started, so a client that disconnects frees its slots at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

logger = logging.getLogger(__name__)

_QUEUED, _RUNNING, _DONE, _DROPPED = range(4)

EncodeBatch = Callable[[Hashable, list[str]], np.ndarray]
# (group, inputs, tokens, seconds the model call took)
BatchObserver = Callable[[Hashable, int, int, float], None]


class BatchResultError(RuntimeError):
    """A model call returned results the batcher cannot split back into its requests (wrong count or shape)."""


def checked_results(results, inputs: int) -> np.ndarray:
    """``results`` of a model call as an (inputs, width) float32 array, or BatchResultError saying what came back."""
    try:
        array = np.asarray(results, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise BatchResultError(f"the model returned {type(results).__name__} that is not an (inputs, width) array "
                               f"of numbers for {inputs} inputs: {err}") from err
    if array.ndim != 2 or len(array) != inputs:
        raise BatchResultError(f"the model returned results of shape {array.shape} for {inputs} inputs; expected "
                               f"({inputs}, width): one row per input")
    return array


class _Item:
    __slots__ = ("job", "index", "tokens", "state")

    def __init__(self, job: EmbedJob, index: int, tokens: int):
        self.job = job
        self.index = index
        self.tokens = tokens
        self.state = _QUEUED


class EmbedJob:
    """One request's inputs; ``future`` resolves to their (n, dim) embeddings in request order."""

    def __init__(self, group: Hashable, texts: list[str], tokens: list[int], loop: asyncio.AbstractEventLoop):
        self.group = group
        self.texts = texts
        self.future: asyncio.Future[np.ndarray] = loop.create_future()
        self.items = [_Item(self, i, t) for i, t in enumerate(tokens)]
        self.enqueued_at = loop.time()
        self.remaining = len(texts)
        self.embeddings: np.ndarray | None = None
        self.cursor = 0  # index of the next item to consider for a batch

    def next_queued(self) -> _Item | None:
        """The next item still waiting for a batch (dropped ones are skipped), or None."""
        while self.cursor < len(self.items) and self.items[self.cursor].state != _QUEUED:
            self.cursor += 1
        return self.items[self.cursor] if self.cursor < len(self.items) else None

    def _store(self, index: int, vector: np.ndarray) -> None:
        """Keep one input's result row; a row of another width than the job's earlier ones fails the job."""
        if self.embeddings is None:
            self.embeddings = np.empty((len(self.texts), vector.shape[-1]), dtype=np.float32)
        if vector.shape != self.embeddings.shape[1:]:
            raise BatchResultError(f"the model returned a row of shape {vector.shape} for input {index} of a request "
                                   f"whose earlier rows have shape {self.embeddings.shape[1:]}")
        self.embeddings[index] = vector
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.embeddings)


class DynamicBatcher:
    def __init__(self, encode_batch: EncodeBatch, *, max_batch_tokens: int, max_delay_s: float,
                 max_concurrent_inputs: int, max_concurrent_tokens: int | None = None,
                 on_batch: BatchObserver | None = None):
        self._encode_batch = encode_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_delay_s
        self.max_concurrent_inputs = max_concurrent_inputs
        self.max_concurrent_tokens = max_concurrent_tokens
        self._on_batch = on_batch
        self._jobs: dict[Hashable, deque[EmbedJob]] = {}  # per group, jobs with queued inputs, oldest first
        self._last_served: dict[Hashable, float] = {}  # loop time each group's last batch was taken
        self._queued_tokens: dict[Hashable, int] = {}
        self._queued_inputs: dict[Hashable, int] = {}
        self.inflight_inputs = 0  # accepted and not yet answered or dropped
        self.inflight_tokens = 0
        # One thread owns the model: ONNX Runtime parallelises inside a run; a second runner would only contend.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft-export-model")
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closing = False

    # ----- lifecycle -----
    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="peft-export-batcher")

    async def run_in_model_thread(self, fn: Callable, *args):
        """Run ``fn`` on the model's thread (used for warm-up, so it never overlaps a batch)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker and the model thread."""
        self._closing = True
        self._wake.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    # ----- admission -----
    def queued_inputs(self, where: Callable[[Hashable], bool] | None = None) -> int:
        """Inputs waiting for a model call, in every group or in the groups ``where`` accepts."""
        return sum(n for group, n in self._queued_inputs.items() if where is None or where(group))

    def over_token_budget(self, tokens: list[int]) -> bool:
        """Whether a request of ``tokens`` would exceed ``max_concurrent_tokens`` now."""
        if self.max_concurrent_tokens is None or self.inflight_tokens == 0:
            return False
        return self.inflight_tokens + sum(tokens) > self.max_concurrent_tokens

    def try_submit(self, group: Hashable, texts: list[str], tokens: list[int]) -> EmbedJob | None:
        """Queue a request's inputs, or return None when that would exceed the inputs or tokens in flight."""
        if self._closing:
            raise RuntimeError("the batcher is stopping")
        if self.inflight_inputs + len(texts) > self.max_concurrent_inputs or self.over_token_budget(tokens):
            return None
        job = EmbedJob(group, texts, tokens, asyncio.get_running_loop())
        self._jobs.setdefault(group, deque()).append(job)
        self._queued_tokens[group] = self._queued_tokens.get(group, 0) + sum(tokens)
        self._queued_inputs[group] = self._queued_inputs.get(group, 0) + len(texts)
        self.inflight_inputs += len(texts)
        self.inflight_tokens += sum(tokens)
        self._wake.set()
        return job

    def cancel(self, job: EmbedJob) -> None:
        """Drop the job's inputs that have not started; inputs already in a model call finish and are discarded."""
        for item in job.items:
            if item.state == _QUEUED:
                item.state = _DROPPED
                self._queued_tokens[job.group] -= item.tokens
                self._queued_inputs[job.group] -= 1
                self.inflight_inputs -= 1
                self.inflight_tokens -= item.tokens
        if not job.future.done():
            job.future.cancel()

    # ----- the worker -----
    def _next_group(self) -> Hashable | None:
        """The group with queued inputs served least recently (never: first), the oldest input breaking ties."""
        best, best_key = None, None
        for group, jobs in self._jobs.items():
            if self._queued_inputs.get(group, 0) <= 0:
                continue
            key = (self._last_served.get(group, float("-inf")), self._oldest_waiting(group))
            if best_key is None or key < best_key:
                best, best_key = group, key
        return best

    def _oldest_waiting(self, group: Hashable) -> float:
        jobs = self._jobs[group]
        while jobs and jobs[0].next_queued() is None:
            jobs.popleft()
        return jobs[0].enqueued_at

    def _take(self, group: Hashable) -> list[_Item]:
        """One batch of ``group``: an input from each waiting job in turn until the token budget is reached."""
        batch: list[_Item] = []
        tokens = 0
        active = list(self._jobs[group])
        while active:
            still = []
            for job in active:
                item = job.next_queued()
                if item is None or (batch and tokens + item.tokens > self.max_batch_tokens):
                    continue  # this job is done, or its next input does not fit this batch
                job.cursor += 1
                item.state = _RUNNING
                batch.append(item)
                tokens += item.tokens
                still.append(job)
            active = still
        self._jobs[group] = deque(job for job in self._jobs[group] if job.next_queued() is not None)
        self._queued_tokens[group] -= tokens
        self._queued_inputs[group] -= len(batch)
        return batch

    async def _wait_for_company(self, group: Hashable, oldest_time: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = oldest_time + self.max_delay_s
        while self._queued_tokens.get(group, 0) < self.max_batch_tokens and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = self._next_group()
            if group is None:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._wait_for_company(group, self._oldest_waiting(group))
            batch = self._take(group) if self._queued_inputs.get(group, 0) > 0 else []
            self._last_served[group] = loop.time()  # its turn is over: every other group with work goes first
            if batch:
                await self._run_batch(loop, group, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, group: Hashable, batch: list[_Item]) -> None:
        """Run one batch and hand each request its rows. Whatever goes wrong (the model call raises, or returns
        something that is not one row per input) fails the requests of this batch, never the worker: the next
        batches still run. The requests' handlers turn the exception into a JSON error (500 unless it is one)."""
        texts = [item.job.texts[item.index] for item in batch]
        started = loop.time()
        try:
            results = await loop.run_in_executor(self._executor, self._encode_batch, group, texts)
            embeddings = checked_results(results, len(batch))
        except Exception as err:
            logger.exception("model call failed for a batch of %d inputs", len(batch))
            for item in batch:
                self._finish(item, err)
            return
        if self._on_batch is not None:
            try:
                self._on_batch(group, len(batch), sum(item.tokens for item in batch), loop.time() - started)
            except Exception:  # metrics must never cost the requests their results
                logger.exception("recording a batch's metrics failed")
        for item, vector in zip(batch, embeddings):
            self._finish(item, vector)

    def _finish(self, item: _Item, result: np.ndarray | Exception) -> None:
        """Release one input's slot and give its job the row, or fail the job with ``result``'s exception."""
        item.state = _DONE
        self.inflight_inputs -= 1
        self.inflight_tokens -= item.tokens
        job = item.job
        if job.future.done():
            return
        if isinstance(result, Exception):
            job.future.set_exception(result)
            return
        try:
            job._store(item.index, result)
        except BatchResultError as err:
            logger.error("%s", err)
            job.future.set_exception(err)
