"""Asynchronous GRPO (grpo.max_staleness = k > 0): a rollout worker thread samples the next rollout batches
with the weights they were handed while the trainer trains the current one; stale samples are dropped.

The schedule is fixed, so a run is deterministic and a resume exact (the sampler seeds each request by
(seed, loop step, rid), train/policies.SeededPolicy). Rollout batch r is sampled with the weights after
batch r-1-k was trained: it is handed to the worker, with a copy of those weights, once batch r-k is
selected and before that batch trains. A checkpoint is a sync point: the rollouts after it are sampled
with the saved weights, and rollouts sampled ahead with older ones (k >= 2) are discarded and their prompts
drawn again, so the checkpoint holds the data iterator as of the last consumed batch and a resumed run
rolls the same batches with the same weights. A sample trained more than k * steps_per_rollout optimizer
steps after its policy version (a server that missed an update) is dropped and counted.

Rewards are scored on the main thread (the "original" answer checker times out by signals); only
`GRPOTrainer.run_rollout` and the weight push run on the worker. One process only (grpo.check_supported).
"""

import collections
import concurrent.futures
import dataclasses
import time

import jax
import numpy as np
from absl import logging

from pixel_reasoner_jax.rollout.trajectory import Trajectory


def staleness(trajs: list[Trajectory], version: int) -> np.ndarray:
    """(B,) float: optimizer steps from each trajectory's oldest sampling policy version to `version`; inf
    for a version that is no optimizer step (e.g. a server's "base"), 0 for a trajectory with no turn."""
    out = np.zeros(len(trajs))
    for i, t in enumerate(trajs):
        if not t.turns:
            continue
        try:
            out[i] = version - min(int(v) for v in t.turn_versions)
        except ValueError:
            out[i] = np.inf
    return out


class RolloutWorker:
    """One background thread that runs rollout jobs in order; each job first brings the policy to the
    weights it carries (`Rollouts.push`), then rolls out (`run(items, step)`).

    A job's metrics add "time/weight_push_s" and "time/rollout_idle_s" (the worker's wait for this job since
    its previous one ended).
    """

    def __init__(self, rollouts, run):
        self.rollouts, self.run = rollouts, run
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self._last_end = time.perf_counter()

    def submit(self, step: int, items: list, params, version: str) -> concurrent.futures.Future:
        """Queues the rollout of `items` at loop `step` with `params` (arrays no train step donates)."""
        return self._pool.submit(self._job, step, items, params, version)

    def _job(self, step, items, params, version):
        t0 = time.perf_counter()
        idle = t0 - self._last_end
        self.rollouts.push(params, version)
        push = time.perf_counter() - t0
        try:
            trajs, metrics = self.run(items, step)
        finally:
            self._last_end = time.perf_counter()
        return trajs, {**metrics, "time/weight_push_s": push, "time/rollout_idle_s": idle}

    def close(self) -> None:
        """Cancels queued jobs and waits for the running one."""
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass
class _Pending:
    step: int  # the rollout's first loop step (its sampling seeds and episode ids)
    iter_state: dict  # the data iterator before this rollout's prompts were drawn
    future: concurrent.futures.Future


def _copy(params):
    # Taken on the main thread before the next step donates the state's buffers.
    return jax.tree.map(lambda x: x.copy(), params)


def train(trainer, step: int, until: int, bar) -> int:
    """`trainer`'s (a grpo.GRPOTrainer) rollout batches from loop `step` to `until`, rolled out ahead by a
    RolloutWorker at most grpo.max_staleness batches; returns the loop step reached (`until`)."""
    cfg = trainer.cfg
    k, spr = cfg.grpo.max_staleness, cfg.grpo.steps_per_rollout
    max_lag = k * spr
    if not cfg.grpo.tis_cap:
        logging.warning(
            "grpo: max_staleness %d without grpo.tis_cap: the ratio's old log-probs are the trainer's "
            "at training time, and nothing corrects for the older policy that sampled", k,
        )  # fmt: skip
    if 0 < cfg.log.checkpoint_every <= max_lag:
        logging.warning(
            "grpo: a checkpoint every %d optimizer steps is a sync point every rollout: little overlaps",
            cfg.log.checkpoint_every,
        )
    worker = RolloutWorker(trainer.rollouts, trainer.run_rollout)
    pending: collections.deque[_Pending] = collections.deque()
    next_step = step
    roll_m: dict[str, float] = {}  # the batch in training's rollout metrics (on_plan adds to them)

    def fill() -> None:
        """Hands the worker rollouts up to k ahead, with the current weights."""
        nonlocal next_step
        params = None
        while len(pending) < k and next_step < until:
            if params is None:
                params, version = _copy(trainer.ctx.state.params), trainer.rollouts.version()
            state = trainer.it.get_state()
            items = trainer.draw_prompts()
            pending.append(_Pending(next_step, state, worker.submit(next_step, items, params, version)))
            next_step += spr

    def on_plan(saves: bool) -> None:
        nonlocal next_step
        if not saves:
            fill()
            return
        # A checkpoint follows this batch: what is sampled ahead uses pre-checkpoint weights, which a resume
        # could not reproduce. Drop it and rewind the prompts; fill() after the save rolls them again.
        roll_m["rollout/discarded_rollouts"] = float(len(pending))
        if pending:
            trainer.it.set_state(pending[0].iter_state)
            next_step = pending[0].step
            for p in pending:
                p.future.cancel()
            pending.clear()

    try:
        fill()
        while step < until:
            job = pending.popleft()
            assert job.step == step, (job.step, step)
            t0 = time.perf_counter()
            trajs, roll_m = job.future.result()
            idle = time.perf_counter() - t0
            lag = staleness(trajs, int(trainer.rollouts.version()))
            keep = lag <= max_lag
            finite = lag[np.isfinite(lag)]
            roll_m.update({
                "time/trainer_idle_s": idle,
                "rollout/staleness_steps": float(finite.mean()) if finite.size else 0.0,
                "rollout/stale_dropped": float((~keep).sum()),
                "rollout/discarded_rollouts": 0.0,
            })  # fmt: skip
            step = trainer.train_batch(step, until, bar, trajs, roll_m, keep=keep, on_plan=on_plan)
            fill()  # after a checkpoint: the rollouts ahead, with the saved weights
    finally:
        worker.close()
    return step
