"""Keep the hottest adapters of a switchable export merged, within a budget of merged sessions.

``EmbeddingModel.merge_adapter`` gives an adapter the speed of a merged export at the cost of its own ONNX Runtime
session (about 50 MB for all-MiniLM-L6-v2). A server with many adapters cannot merge them all, so
:class:`MergedAdapterBudget` decides which ones run merged, from the traffic it sees:

* **Budget:** at most ``budget`` adapters are merged by it at any moment (a count of merged sessions: memory is
  ``budget`` x the per-adapter cost, which ``merge_adapter`` documents). Adapters merged before it was created
  (``--merge-adapter NAME``) are pinned: never evicted, not counted.
* **Recency:** merged adapters are kept in least-recently-used order; when the budget is full, the adapter that
  was requested least recently is the one evicted (``unmerge_adapter``, its session is freed).
* **Admission gate:** a cold adapter only takes the place of that least recently used one when it was requested
  clearly more often in the recent window (``admit_ratio`` x as many of the last ``window`` requests, and at least
  ``min_requests``). Pure LRU would evict and rebuild a session on nearly every request of uniform traffic over
  more adapters than the budget holds (a merge costs about a second of CPU); with the gate uniform traffic
  settles on a fixed merged set and skewed traffic keeps its hot adapters merged.
* **No waiting:** merges run one at a time on a background thread; until an adapter's merged session is ready its
  requests run through the LoRA branches of the switchable graph, which give the same answer (float rounding,
  ~1e-7). Eviction happens before the replacement is built, so the budget holds at every instant.

``touch`` is cheap (a few dict operations under a lock) and is called once per model call by the server.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError

logger = logging.getLogger(__name__)


class MergedAdapterBudget:
    """LRU set of merged adapters of ``model`` (an ``EmbeddingModel`` of a switchable ONNX Runtime export).

    ``background=False`` merges inside ``touch`` (tests, benchmarks that want a settled state at once).
    """

    def __init__(self, model: Any, budget: int, *, window: int = 256, admit_ratio: float = 1.5,
                 min_requests: int = 4, background: bool = True):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ConfigError(f"The merged-adapter budget must be a count of adapters >= 0, found {budget!r}")
        if not getattr(model, "is_switchable", False) or not hasattr(model, "merge_adapter"):
            raise ConfigError("A merged-adapter budget needs a switchable export (merge-onnx --switchable); this "
                              "model has no adapters to merge")
        if budget and not model.backend.can_merge_adapters:
            raise ConfigError(f"A merged-adapter budget needs the ONNX Runtime backend; this model runs on "
                              f"{model.backend.name}, where adapters always run on the switchable graph")
        self.model = model
        self.budget = budget
        self.window = window
        self.admit_ratio = admit_ratio
        self.min_requests = min_requests
        self.pinned = frozenset(model.merged_adapters())
        self._lock = threading.Lock()
        self._merged: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._pending: str | None = None  # the adapter being merged now
        self._recent: deque[str] = deque()
        self._counts: Counter[str] = Counter()
        self.evictions: list[str] = []  # every adapter evicted, in order (tests, metrics)
        self.merges: list[str] = []  # every adapter merged, in order
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft-export-merge") \
            if background else None
        self._future: Future | None = None
        self._failed: set[str] = set()  # merges that raised: not tried again

    # ----- what the server calls -----
    def touch(self, adapter: str | None) -> None:
        """Record one model call for ``adapter`` (None: the base) and merge or evict as the policy says."""
        if adapter is None or adapter is False or adapter in self.pinned or self.budget == 0:
            return
        with self._lock:
            self._record(adapter)
            if adapter in self._merged:
                self._merged.move_to_end(adapter)
                return
            if self._pending is not None or adapter in self._failed or not self._admit(adapter):
                return
            victim = self._merged.popitem(last=False)[0] if len(self._merged) >= self.budget else None
            self._pending = adapter
        if victim is not None:
            self.model.unmerge_adapter(victim)  # first: the budget holds while the replacement is built
            self.evictions.append(victim)
            logger.info("merged-adapter budget: evicted %s for %s", victim, adapter)
        if self._executor is None:
            self._merge(adapter)
        else:
            self._future = self._executor.submit(self._merge, adapter)

    def merged(self) -> list[str]:
        """Adapters merged by the budget, least recently used first (pinned ones not included)."""
        with self._lock:
            return list(self._merged)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the merge in progress (if any) is done."""
        future = self._future
        if future is not None:
            future.result(timeout)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"budget": self.budget, "merged": list(self._merged), "pinned": sorted(self.pinned),
                    "merging": self._pending, "evictions": len(self.evictions), "merges": len(self.merges)}

    # ----- policy -----
    def _record(self, adapter: str) -> None:
        self._recent.append(adapter)
        self._counts[adapter] += 1
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            self._counts[old] -= 1

    def _admit(self, adapter: str) -> bool:
        """Called under the lock for a cold adapter: merge it now?"""
        if len(self._merged) < self.budget:
            return True  # free room: every requested adapter is worth a session
        victim = next(iter(self._merged))
        count = self._counts[adapter]
        return count >= self.min_requests and count >= self.admit_ratio * max(self._counts[victim], 1)

    def _merge(self, adapter: str) -> None:
        try:
            self.model.merge_adapter(adapter)
        except Exception:  # a failed merge leaves the adapter on the LoRA branches, which still answer correctly
            logger.exception("merged-adapter budget: merging %s failed; it keeps running on the LoRA branches",
                             adapter)
            with self._lock:
                self._pending = None
                self._failed.add(adapter)
            return
        with self._lock:
            self._pending = None
            self._merged[adapter] = None
            self.merges.append(adapter)
        logger.info("merged-adapter budget: merged %s", adapter)
