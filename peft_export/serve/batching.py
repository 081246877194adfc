"""Dynamic batching: inputs of concurrent requests are merged into model calls and the results split back.

Each request becomes an ``EmbedJob`` whose inputs wait in a queue of their *group* (adapter + prompt: the
settings a model call shares). One worker task forms batches: it picks the group whose oldest input has waited
longest, waits at most ``max_delay_s`` from that input's arrival for more company, then takes inputs in
arrival order until ``max_batch_tokens`` is reached (always at least one) and runs the model in a dedicated
thread, so the event loop keeps accepting, parsing and answering requests while ONNX Runtime computes.
A request larger than the budget is simply spread over several consecutive batches.

Admission is counted in inputs: ``try_submit`` refuses (returns None) when accepting the request would put more
than ``max_concurrent_inputs`` inputs in flight. ``cancel`` drops a job's inputs that have not started, so a
client that disconnects frees its slots at once.
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

    def _store(self, index: int, vector: np.ndarray) -> None:
        if self.embeddings is None:
            self.embeddings = np.empty((len(self.texts), vector.shape[-1]), dtype=np.float32)
        self.embeddings[index] = vector
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.embeddings)


class DynamicBatcher:
    def __init__(self, encode_batch: EncodeBatch, *, max_batch_tokens: int, max_delay_s: float,
                 max_concurrent_inputs: int, on_batch: BatchObserver | None = None):
        self._encode_batch = encode_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_delay_s
        self.max_concurrent_inputs = max_concurrent_inputs
        self._on_batch = on_batch
        self._queues: dict[Hashable, deque[_Item]] = {}
        self._queued_tokens: dict[Hashable, int] = {}
        self._queued_inputs: dict[Hashable, int] = {}
        self.inflight_inputs = 0  # accepted and not yet answered or dropped
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

    def try_submit(self, group: Hashable, texts: list[str], tokens: list[int]) -> EmbedJob | None:
        """Queue a request's inputs, or return None when that would exceed ``max_concurrent_inputs``."""
        if self._closing:
            raise RuntimeError("the batcher is stopping")
        if self.inflight_inputs + len(texts) > self.max_concurrent_inputs:
            return None
        job = EmbedJob(group, texts, tokens, asyncio.get_running_loop())
        queue = self._queues.setdefault(group, deque())
        queue.extend(job.items)
        self._queued_tokens[group] = self._queued_tokens.get(group, 0) + sum(tokens)
        self._queued_inputs[group] = self._queued_inputs.get(group, 0) + len(texts)
        self.inflight_inputs += len(texts)
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
        if not job.future.done():
            job.future.cancel()

    # ----- the worker -----
    def _oldest_group(self) -> Hashable | None:
        best, best_time = None, None
        for group, queue in self._queues.items():
            while queue and queue[0].state == _DROPPED:
                queue.popleft()
            if queue and (best_time is None or queue[0].job.enqueued_at < best_time):
                best, best_time = group, queue[0].job.enqueued_at
        return best

    def _take(self, group: Hashable) -> list[_Item]:
        queue = self._queues[group]
        batch: list[_Item] = []
        tokens = 0
        while queue:
            item = queue[0]
            if item.state == _DROPPED:
                queue.popleft()
                continue
            if batch and tokens + item.tokens > self.max_batch_tokens:
                break
            queue.popleft()
            item.state = _RUNNING
            batch.append(item)
            tokens += item.tokens
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
            group = self._oldest_group()
            if group is None:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._wait_for_company(group, self._queues[group][0].job.enqueued_at)
            batch = self._take(group)
            if batch:
                await self._run_batch(loop, group, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, group: Hashable, batch: list[_Item]) -> None:
        texts = [item.job.texts[item.index] for item in batch]
        started = loop.time()
        try:
            embeddings = await loop.run_in_executor(self._executor, self._encode_batch, group, texts)
            if len(embeddings) != len(batch):
                raise RuntimeError(f"the model returned {len(embeddings)} embeddings for {len(batch)} inputs")
        except Exception as err:  # one failed batch fails its requests, never the worker
            logger.exception("model call failed for a batch of %d inputs", len(batch))
            for item in batch:
                item.state = _DONE
                self.inflight_inputs -= 1
                if not item.job.future.done():
                    item.job.future.set_exception(err)
            return
        if self._on_batch is not None:
            self._on_batch(group, len(batch), sum(item.tokens for item in batch), loop.time() - started)
        for item, vector in zip(batch, embeddings):
            item.state = _DONE
            self.inflight_inputs -= 1
            if not item.job.future.done():
                item.job._store(item.index, vector)
