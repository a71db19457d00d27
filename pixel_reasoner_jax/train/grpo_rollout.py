"""The rollout side of the GRPO loop: RL prompts drawn per process, G episodes each through the run's policy
(in-process sampler or SGLang servers), accuracy and shaped rewards, group advantages, rollout dumps.
"""

import dataclasses
import time
from collections.abc import Callable

import numpy as np
from absl import logging

from pixel_reasoner_jax.config import RunConfig
from pixel_reasoner_jax.data import loader
from pixel_reasoner_jax.data.records import RLRecord, load_rl_records
from pixel_reasoner_jax.eval import rows  # the eval dump schema, so eval.viewer renders rollouts too
from pixel_reasoner_jax.rollout import faithfulness
from pixel_reasoner_jax.rollout.episode import (
    STATUSES,
    Episode,
    EpisodeConfig,
    PromptMedia,
    Trajectory,
    run_episodes,
)
from pixel_reasoner_jax.train import advantages, multihost, rewards
from pixel_reasoner_jax.train.policies import Rollouts, SeededPolicy
from pixel_reasoner_jax.train.run import RunContext

ROLLOUTS_DIR = "rollouts"  # rollout dumps for eval.viewer (log.rollouts_every)
AccuracyFn = Callable[[Trajectory], float]


def load_rl(cfg: RunConfig) -> list[RLRecord]:
    records, report = load_rl_records(cfg.data.rl_path, cfg.data.data_root)
    report.log()
    return records


def default_accuracy(cfg: RunConfig) -> AccuracyFn:
    """The accuracy reward under `reward.scoring` (train/rewards.accuracy_reward, reference §9.1): "original"
    gives {-1, 0, 1} on the text the original scored (Trajectory.scored_text), "strict" {0, 1}."""

    def accuracy(traj: Trajectory) -> float:
        return rewards.accuracy_reward(
            traj.scored_text(cfg.reward.scoring),
            traj.record.answer,
            scoring=cfg.reward.scoring,
            require_boxed=cfg.reward.require_boxed,
            ended_after_failed_call=cfg.reward.zero_after_failed_call and traj.ended_after_failed_call,
        )

    return accuracy


def episode_config(cfg: RunConfig) -> EpisodeConfig:
    """The rollouts' episode limits: the rollout section's, with the data section's image and video sizes."""
    d = cfg.data
    return dataclasses.replace(
        EpisodeConfig.from_rollout(cfg.rollout),
        original_min_pixels=d.image_min_pixels,
        original_max_pixels=d.image_max_pixels,
        video_min_pixels=min(d.image_min_pixels, d.video_frame_max_pixels),
        video_max_pixels=d.video_frame_max_pixels,
        num_video_frames=d.num_video_frames,
    )


def mean(x) -> float:
    """The mean as a float; 0.0 for an empty batch (a metric of a rollout with nothing in it)."""
    x = np.asarray(x, np.float64)
    return float(x.mean()) if x.size else 0.0


class RolloutBatches:
    """Rollout batches and their scores: the rollout side of grpo.GRPOTrainer, its base class.

    Args:
      ctx: the run.
      records: the RL prompts.
      accuracy_fn: trajectory -> accuracy reward; default: `default_accuracy` (reward.scoring).
      iter_state: the prompt iterator's checkpointed state; None: from the start of the stream.
    """

    def __init__(
        self,
        ctx: RunContext,
        records: list[RLRecord],
        accuracy_fn: AccuracyFn | None,
        iter_state: dict | None,
    ):
        cfg = ctx.cfg
        self.ctx, self.cfg = ctx, cfg
        self.accuracy_fn = accuracy_fn or default_accuracy(cfg)
        # Each process reads its own shard of the prompt stream (train/multihost.py); every process's
        # iterator state is the same count, so process 0's checkpointed state resumes them all.
        ds = loader.rl_dataset(records, cfg.data.seed, num_epochs=None, num_frames=cfg.data.num_video_frames)
        self.it = loader.make_iterator(ds)
        if iter_state:
            self.it.set_state(iter_state)
        rw = cfg.reward
        self.reward_constants = rewards.form_constants(rw.form, alpha=rw.alpha, H=rw.H, beta=rw.beta, N=rw.N)
        logging.info("grpo: reward form %r with %s", rw.form, self.reward_constants)
        self.episode_cfg = episode_config(cfg)
        self.rollouts = Rollouts(ctx)

    def draw_prompts(self) -> list[dict]:
        """This process's share of the next rollout batch's prompts from the data iterator."""
        return [next(self.it) for _ in range(multihost.local_prompts(self.cfg.grpo.prompts_per_rollout))]

    def rollout(self, step: int) -> tuple[list[Trajectory], dict[str, float]]:
        """The synchronous rollout: the policy brought to the train state, then `run_rollout` on this thread
        (the trainer idles meanwhile)."""
        items = self.draw_prompts()
        t0 = time.perf_counter()
        self.rollouts.sync()
        push = time.perf_counter() - t0
        trajs, metrics = self.run_rollout(items, step)
        metrics["time/weight_push_s"] = push
        metrics["time/trainer_idle_s"] = push + metrics["time/rollout_s"]
        return trajs, metrics

    def run_rollout(self, items: list[dict], step: int) -> tuple[list[Trajectory], dict[str, float]]:
        """G episodes per prompt under the policy's current weights, seeded by (seed, loop step, rid).

        Touches no trainer state (train/async_rollout.py calls it from its worker thread).
        """
        cfg, ctx, g = self.cfg, self.ctx, self.cfg.grpo.group_size
        t0 = time.perf_counter()
        proc = self.rollouts.processor
        episodes = []
        for k, item in enumerate(items):
            video = item["video"]
            media = PromptMedia(images=tuple(item["images"]), video_frames=tuple(video) if video else None)
            for j in range(g):
                episodes.append(
                    Episode.start(
                        item["record"],
                        ctx.tokenizer,
                        self.episode_cfg,
                        None,
                        proc,
                        media=media,
                        episode_id=f"s{step}-p{multihost.batch_prompt_index(k)}-g{j}",
                    )  # fmt: skip
                )
        policy = SeededPolicy(self.rollouts.policy, cfg.seed, step)
        trajs = run_episodes(policy, episodes, max_concurrency=cfg.rollout.batch_size)
        trajs = multihost.gather_rollout(trajs, g)  # every process's episodes, in one-process order
        dt = time.perf_counter() - t0
        sampled = [int(t.loss_mask.sum()) for t in trajs]
        unit, count = self.rollouts.units
        metrics = {
            "time/rollout_s": dt,
            "throughput/rollout_tokens_per_s": sum(sampled) / dt,
            f"throughput/rollout_tokens_per_s_per_{unit}": sum(sampled) / dt / count,
            "rollout/response_tokens": mean(sampled),
            "rollout/sequence_tokens": mean([t.expanded_length for t in trajs]),
            "tools/calls_per_response": mean([t.num_calls for t in trajs]),
            "tools/valid_calls_per_response": mean([t.num_valid_calls for t in trajs]),
            "tools/failed_calls_per_response": mean([t.num_failed_calls for t in trajs]),
        }
        for status in STATUSES:
            metrics[f"rollout/status_{status}"] = mean([t.status == status for t in trajs])
        metrics.update(self.rollouts.metrics())  # per-server counters when rolling out on SGLang servers
        return trajs, metrics

    def score(
        self, trajs: list[Trajectory], step: int, keep: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """(advantages (B,), informative (B,) bool, metrics) of the rollout batch at loop `step`; samples
        outside `keep` (dropped, e.g. too stale) are scored like untrainable ones: reward 0 and never
        informative. Dumps the batch's first groups every `log.rollouts_every` loop steps."""
        cfg, g = self.cfg, self.cfg.grpo.group_size
        t0 = time.perf_counter()
        trainable = np.array([t.trainable for t in trajs], bool)
        if keep is not None:
            trainable &= keep
        acc = np.array([float(self.accuracy_fn(t)) if ok else 0.0 for t, ok in zip(trajs, trainable)])
        rw = cfg.reward
        shaped = rewards.batch_rewards(
            acc,
            [t.num_calls for t in trajs],
            [t.num_valid_calls for t in trajs],
            group_size=g,
            is_video=np.array([bool(t.record.is_video) for t in trajs]),
            form=rw.form, **self.reward_constants, curiosity=rw.curiosity, penalty=rw.penalty,
        )  # fmt: skip
        adv = advantages.group_advantages(shaped["shaped"], g, cfg.grpo.advantage)
        uniform = advantages.uniform_groups(shaped["shaped"], g, cfg.grpo.uniform_tol)
        informative = trainable & ~np.repeat(uniform, g)
        metrics = {
            "reward/shaped": mean(shaped["shaped"]),
            "reward/accuracy": mean(acc),
            # The original's "exceptions": share of -1 scores (nothing parsable), which lower the mean above.
            "reward/unparsed": mean(acc < 0),
            "reward/rapr": shaped["rapr"],
            "reward/curiosity_bonus": mean(shaped["bonus"]),
            "reward/penalty": mean(shaped["penalty"]),
            "reward/zero_spread_groups": mean(uniform),
            "reward/informative_samples": mean(informative),
            "time/reward_s": time.perf_counter() - t0,
        }
        metrics.update(faithfulness.rollout_metrics(trajs, acc > 0.5))  # crops that show the target box
        lg = cfg.log
        if lg.rollouts_every and step % lg.rollouts_every == 0 and self.ctx.is_main:
            rows.dump_rollouts(
                trajs, self.ctx.workdir / ROLLOUTS_DIR / f"step_{step:06d}", self.ctx.tokenizer,
                group_size=g, groups=lg.rollout_groups, scoring=rw.scoring, require_boxed=rw.require_boxed,
                accuracy_reward=acc, shaped_reward=shaped["shaped"], advantage=adv,
            )  # fmt: skip
        return adv, informative, metrics

    def close(self) -> None:
        self.rollouts.close()
