"""Batching for the server: concurrent jobs -> one policy call per batch, with abort, pause and resume.

Each job resolves its own future; a batch and a weight update exclude each other through `model_lock`.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

from pixel_reasoner_jax.rollout.policy import FINISH_ABORT, GenerationRequest, GenerationResult, Policy

logger = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")


class DuplicateRequestError(ValueError):
    """A request reuses the rid of one still queued or running (SGLang answers 400)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One sample in the queue; `future` resolves to its GenerationResult."""

    request: GenerationRequest
    rid: str
    prompt_tokens: int
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    abort_message: str | None = None
    retracted: bool = False  # paused with mode "retract" while running: queued again, result discarded


class BatchWorker:
    """Collects concurrent jobs into batches (up to max_batch, within a short wait) for one policy call.

    Each job has its own future, so concurrent HTTP requests never see each other's results. A batch runs
    under `model_lock`, which weight updates also take: an update waits for the running batch, and batches
    wait for the update.
    """

    def __init__(self, get_policy: Callable[[], Policy], max_batch: int, wait_s: float, model_lock):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._get_policy = get_policy
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.model_lock = model_lock
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._paused = False
        self._stopped = False
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="batch-worker", daemon=True)
        self._thread.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queues the jobs; raises DuplicateRequestError when a rid is already queued or running."""
        with self._cv:
            active = {j.rid for j in self._queue} | {j.rid for j in self._running}
            rids = [j.rid for j in jobs]
            dup = sorted({r for r in rids if r in active or rids.count(r) > 1})
            if dup:
                raise DuplicateRequestError(f"Duplicate request ID detected: {dup[0]}")
            if self._stopped:
                for j in jobs:
                    self._abort(j, "server is shutting down")
                return
            self._queue.extend(jobs)
            self._cv.notify_all()

    def busy(self) -> bool:
        with self._cv:
            return bool(self._queue or self._running)

    def abort(self, message: str, rids: set[str] | None = None) -> int:
        """Aborts queued jobs now and marks running ones (their results are discarded); None = all."""
        with self._cv:
            hit = [j for j in self._queue if rids is None or j.rid in rids]
            for j in hit:
                self._queue.remove(j)
                self._abort(j, message)
            running = [j for j in self._running if rids is None or j.rid in rids]
            for j in running:
                j.abort_message = message
            return len(hit) + len(running)

    def pause(self, mode: str = "abort") -> int:
        """Stops taking batches. SGLang's modes (reference/sglang.md §12): "abort" aborts queued and
        running requests; "retract" puts running requests back at the head of the queue (their current
        batch's results are discarded, they run again after /continue_generation); "in_place" lets the
        running batch finish and holds the queue. Returns how many requests were aborted or retracted."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._cv:
            self._paused = True
            if mode == "retract":
                for j in self._running:
                    j.retracted = True
                return len(self._running)
        return self.abort("aborted by /pause_generation") if mode == "abort" else 0

    def active_rids(self) -> set[str]:
        """Rids of queued and running requests (SGLang rejects a new request that reuses one)."""
        with self._cv:
            return {j.rid for j in self._queue} | {j.rid for j in self._running}

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def stop(self, timeout: float = 30.0) -> None:
        """Aborts queued jobs, lets the running batch finish, and ends the thread."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self.abort("server is shutting down")
        self._thread.join(timeout)

    def _abort(self, job: Job, message: str) -> None:
        job.abort_message = message
        if not job.future.done():
            job.future.set_result(
                GenerationResult(
                    (), (), FINISH_ABORT, None, self._get_policy().weight_version, job.prompt_tokens
                )
            )

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (self._paused or not self._queue):
                    self._cv.wait()
                if self._stopped:
                    return
                # A short window lets requests that arrive together share one policy call.
                deadline = time.monotonic() + self.wait_s
                while len(self._queue) < self.max_batch and not self._stopped and not self._paused:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._stopped or self._paused or not self._queue:
                    continue
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self._running = batch
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        try:
            with self.model_lock:
                live = [j for j in batch if j.abort_message is None]
                results = self._get_policy().generate([j.request for j in live]) if live else []
                if len(results) != len(live):
                    raise RuntimeError(f"policy returned {len(results)} results for {len(live)} requests")
                self.batch_sizes.append(len(live))
        except Exception as e:  # noqa: BLE001 - reported to each waiting request, logged here
            logger.exception("policy.generate failed on a batch of %d", len(batch))
            with self._cv:
                self._running = []
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        with self._cv:
            self._running = []
            by_job = dict(zip(live, results))
            retracted = [j for j in batch if j.retracted and j.abort_message is None]
            for j in reversed(retracted):
                j.retracted = False
                self._queue.appendleft(j)
            for j in batch:
                if j.abort_message is not None:
                    self._abort(j, j.abort_message)
                elif j not in retracted:
                    j.future.set_result(by_job[j])
