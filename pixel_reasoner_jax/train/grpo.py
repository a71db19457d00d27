"""The GRPO loop: prompts x G episodes through a Policy, shaped rewards, group advantages, zero-advantage
filtering (refill or selective replay), old and reference log-probs, clipped-objective steps, metrics, resume.

`run` is the grpo mode (an optional SFT warm start first); `GRPOTrainer` is the loop, usable on its own.
Loop steps count every planned step and number the metric lines; optimizer steps count the steps that
trained and number the checkpoints and the LR schedule. A rollout without a sample to train on (no
informative group, nothing to replay) is skipped: its loop steps pass, the optimizer step does not move.
"""

import dataclasses
import pathlib
import time
from collections.abc import Callable

import numpy as np
from absl import logging

from pixel_reasoner_jax.config import ConfigError, RunConfig
from pixel_reasoner_jax.data import loader
from pixel_reasoner_jax.data.records import RLRecord, load_rl_records
from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.processing.batch import Example, expand_trajectory
from pixel_reasoner_jax.rollout import faithfulness
from pixel_reasoner_jax.rollout.episode import (
    STATUSES,
    Episode,
    EpisodeConfig,
    PromptMedia,
    Trajectory,
    run_episodes,
)
from pixel_reasoner_jax.train import advantages, replay, replay_samples, rewards, sft, steps
from pixel_reasoner_jax.train.policies import Rollouts, SeededPolicy
from pixel_reasoner_jax.train.run import RunContext, host, scalars

PHASE = "grpo"
REFERENCE_DIR = "grpo_reference"
AccuracyFn = Callable[[Trajectory], float]


def load_rl(cfg: RunConfig) -> list[RLRecord]:
    records, report = load_rl_records(cfg.data.rl_path, cfg.data.data_root)
    report.log()
    return records


def total_grpo_steps(cfg: RunConfig, num_records: int) -> int:
    """grpo.steps, or num_episodes passes of whole rollout batches over the prompts when it is -1."""
    g = cfg.grpo
    if g.steps > 0:
        return g.steps
    return g.num_episodes * max(1, num_records // g.prompts_per_rollout) * g.steps_per_rollout


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


# ---------------------------------------------------------------------------------------------------------
# The KL reference policy
# ---------------------------------------------------------------------------------------------------------


def reference_params(ctx: RunContext, sft_steps: int):
    """The frozen reference of the KL term: the policy at the start of GRPO, on the train shardings.

    Read from a Hugging Face folder on a fresh start and on a resume alike, so both see the same weights:
    the run's checkpoint when GRPO starts from it, or `workdir/grpo_reference`, written when GRPO starts
    after an SFT warm start (the warm-start checkpoint itself may since have been rotated away).
    """
    folder = pathlib.Path(ctx.cfg.model.checkpoint)
    if sft_steps:
        folder = ctx.workdir / REFERENCE_DIR
        if ctx.extra.get("phase") != PHASE:  # GRPO starts now
            hf_io.export_hf(
                ctx.state.params, ctx.model_cfg, folder, extra_files_from=ctx.cfg.model.checkpoint
            )
        elif not folder.is_dir():
            raise FileNotFoundError(f"the KL reference policy {folder} of this run is missing; cannot resume")
    return ctx.load_params(folder)


@dataclasses.dataclass
class Selection:
    """What one rollout batch trains on: examples with their advantages and, for replayed (SSR) samples,
    the old log-probs stored with them (None: computed from the batch before the first update)."""

    examples: list[Example]
    advantages: np.ndarray
    old_logprobs: list[np.ndarray] | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def _mean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.mean()) if x.size else 0.0


class GRPOTrainer:
    """Rollout -> reward -> filter -> steps, one rollout batch at a time, from the context's loop step.

    Args:
      ctx: the run (its state is updated in place).
      records: the RL prompts.
      sft_steps: steps taken by the warm start (GRPO checkpoints count from there).
      accuracy_fn: trajectory -> accuracy reward; default: `default_accuracy` (reward.scoring).
    """

    def __init__(
        self, ctx: RunContext, records: list[RLRecord], sft_steps: int, accuracy_fn: AccuracyFn | None
    ):
        cfg = ctx.cfg
        self.ctx, self.cfg, self.sft_steps = ctx, cfg, sft_steps
        self.accuracy_fn = accuracy_fn or default_accuracy(cfg)
        extra = ctx.extra if ctx.extra.get("phase") == PHASE else {}
        ds = loader.rl_dataset(
            records, cfg.data.seed, num_epochs=None, process_index=0, process_count=1,
            num_frames=cfg.data.num_video_frames,
        )  # fmt: skip
        self.it = loader.make_iterator(ds)  # every process rolls out the same prompts (one SPMD program)
        if extra.get("rl_iter"):
            self.it.set_state(extra["rl_iter"])
        self.rng = np.random.Generator(np.random.PCG64(cfg.seed))
        if extra.get("np_rng"):
            self.rng.bit_generator.state = extra["np_rng"]
        self.replay = None
        if cfg.grpo.filter == "ssr":
            self.replay = replay.SelectiveReplayBuffer(cfg.grpo.replay_size, cfg.seed)
            self.media = replay_samples.MediaStore(ctx.workdir / replay_samples.MEDIA_DIR)
            if extra.get("replay"):
                self.replay.load_state_dict(extra["replay"], ctx.checkpointer.arrays(ctx.restored_step))
        self.skipped = int(extra.get("skipped_steps", 0))
        self.opt_step = int(host(ctx.state.step))
        rw = cfg.reward
        self.reward_constants = rewards.form_constants(rw.form, alpha=rw.alpha, H=rw.H, beta=rw.beta, N=rw.N)
        logging.info("grpo: reward form %r with %s", rw.form, self.reward_constants)
        d = cfg.data
        self.episode_cfg = dataclasses.replace(
            EpisodeConfig.from_rollout(cfg.rollout),
            original_min_pixels=d.image_min_pixels,
            original_max_pixels=d.image_max_pixels,
            video_min_pixels=min(d.image_min_pixels, d.video_frame_max_pixels),
            video_max_pixels=d.video_frame_max_pixels,
            num_video_frames=d.num_video_frames,
        )
        settings = steps.GRPOLossSettings.from_config(cfg.grpo, cfg.data.max_seq_len)
        self.fns = sft.make_fns(ctx, grpo=settings)
        # Loaded once, kept on device: one more log-prob pass per batch when the KL term is on.
        self.ref_params = reference_params(ctx, sft_steps) if cfg.grpo.kl_coef > 0 else None
        self.rollouts = Rollouts(ctx)

    def extra(self, loop_step: int) -> tuple[dict, dict]:
        """(JSON extra, NumPy arrays) of a checkpoint at `loop_step`."""
        arrays = {}
        out = {
            "phase": PHASE,
            "loop_step": loop_step,
            "sft_iter": self.ctx.extra.get("sft_iter"),
            "rl_iter": self.it.get_state(),
            "np_rng": self.rng.bit_generator.state,
            "skipped_steps": self.skipped,
        }
        if self.replay is not None:
            out["replay"], arrays = self.replay.state_dict()
        return out, arrays

    # ---------------------------------------------------------------------------------- rollout

    def rollout(self, step: int) -> tuple[list[Trajectory], dict[str, float]]:
        cfg, ctx, g = self.cfg, self.ctx, self.cfg.grpo.group_size
        items = [next(self.it) for _ in range(cfg.grpo.prompts_per_rollout)]
        self.rollouts.sync()
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
                        episode_id=f"s{step}-p{k}-g{j}",
                    )  # fmt: skip
                )
        policy = SeededPolicy(self.rollouts.policy, cfg.seed, step)
        trajs = run_episodes(policy, episodes, max_concurrency=cfg.rollout.batch_size)
        dt = time.perf_counter() - t0
        sampled = [int(t.loss_mask.sum()) for t in trajs]
        metrics = {
            "time/rollout_s": dt,
            "throughput/rollout_tokens_per_s": sum(sampled) / dt,
            "rollout/response_tokens": _mean(sampled),
            "rollout/sequence_tokens": _mean([t.expanded_length for t in trajs]),
            "tools/calls_per_response": _mean([t.num_calls for t in trajs]),
            "tools/valid_calls_per_response": _mean([t.num_valid_calls for t in trajs]),
            "tools/failed_calls_per_response": _mean([t.num_failed_calls for t in trajs]),
        }
        for status in STATUSES:
            metrics[f"rollout/status_{status}"] = _mean([t.status == status for t in trajs])
        return trajs, metrics

    def score(self, trajs: list[Trajectory]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """(advantages (B,), informative (B,) bool, metrics) of one rollout batch."""
        cfg, g = self.cfg, self.cfg.grpo.group_size
        t0 = time.perf_counter()
        acc = np.array([float(self.accuracy_fn(t)) if t.trainable else 0.0 for t in trajs])
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
        trainable = np.array([t.trainable for t in trajs])
        informative = trainable & ~np.repeat(uniform, g)
        metrics = {
            "reward/shaped": _mean(shaped["shaped"]),
            "reward/accuracy": _mean(acc),
            # The original's "exceptions": share of -1 scores (nothing parsable), which lower the mean above.
            "reward/unparsed": _mean(acc < 0),
            "reward/rapr": shaped["rapr"],
            "reward/curiosity_bonus": _mean(shaped["bonus"]),
            "reward/penalty": _mean(shaped["penalty"]),
            "reward/zero_spread_groups": _mean(uniform),
            "reward/informative_samples": _mean(informative),
            "time/reward_s": time.perf_counter() - t0,
        }
        metrics.update(faithfulness.rollout_metrics(trajs, acc > 0.5))  # crops that show the target box
        return adv, informative, metrics

    def select(self, trajs, adv, informative) -> Selection:
        """The rollout batch's training samples, or none (the steps are skipped).

        refill: informative samples repeated back to the rollout batch (the original's `--filter True`);
        ssr: half the rollout batch, fresh informative samples first, replay fills the rest (`--filter
        SSR`, `replay.SelectiveReplayBuffer.mix`); none: every trainable sample.
        """
        n = self.cfg.grpo.trained_per_rollout
        mode = self.cfg.grpo.filter
        proc, mcfg = self.rollouts.processor, self.ctx.model_cfg
        cache: dict[int, Example] = {}

        def ex(i: int) -> Example:
            if i not in cache:
                cache[i] = expand_trajectory(trajs[i], proc, mcfg)
            return cache[i]

        if mode == "ssr":
            fresh = np.flatnonzero(informative)
            exs = [ex(i) for i in fresh]
            # Old log-probs now, under the policy that sampled them: replayed later, they keep these.
            lps = self._logprobs_of(exs)
            stored = [
                replay_samples.encode_sample(e, lp, trajs[i].media, self.media)
                for i, e, lp in zip(fresh, exs, lps)
            ]
            samples, adv_s, n_fresh = self.replay.mix(stored, adv[fresh], n)
            # The original's DataLoader(shuffle=True) mixes fresh and replayed samples across steps.
            order = self.rng.permutation(len(samples))
            # This rollout's samples are at hand; older ones are rebuilt from their media (bit-identical).
            known = {id(s): (e, lp) for s, e, lp in zip(stored, exs, lps)}
            decoded = [
                known.get(id(samples[i])) or replay_samples.decode_sample(samples[i], self.media, proc, mcfg)
                for i in order
            ]
            metrics = {
                "replay/fresh_samples": float(n_fresh),
                "replay/replayed_samples": float(len(samples) - n_fresh),
                "replay/buffer_size": float(len(self.replay)),
            }
            return Selection([e for e, _ in decoded], adv_s[order], [lp for _, lp in decoded], metrics)
        pool = informative if mode == "refill" else np.array([t.trainable for t in trajs])
        idx = replay.refill_informative(np.flatnonzero(pool).tolist(), n, self.rng)
        return Selection([ex(i) for i in idx], adv[np.asarray(idx, np.int64)] if idx else np.zeros((0,)))

    # ---------------------------------------------------------------------------------- train

    def _logprobs_of(self, examples: list[Example]) -> list[np.ndarray]:
        """Each example's log-probs of its trained targets under the current policy, in train batches."""
        tb, out = self.cfg.grpo.train_batch_size, []
        for i in range(0, len(examples), tb):
            part = examples[i : i + tb]
            micro = sft.make_micro(self.ctx, part + part[:1] * (tb - len(part)), self.cfg.grpo.micro_batches)
            lp = host(self.fns.logprobs(self.ctx.state.params, micro)).astype(np.float32)
            out.extend(replay.trained_values(lp, micro["loss_mask"])[: len(part)])
        return out

    def _micro(self, examples: list[Example], adv: np.ndarray, old: list[np.ndarray] | None) -> dict:
        micro = sft.make_micro(self.ctx, examples, self.cfg.grpo.micro_batches)
        micro["advantages"] = adv.astype(np.float32).reshape(micro["advantages"].shape)
        # Old log-probs from the trainer's own forward at rollout time (the policy the samples came from,
        # in the trainer's numerics); the sampler's stay in `sampler_logprobs` for TIS and the gap metric.
        if old is None:
            micro["old_logprobs"] = host(self.fns.logprobs(self.ctx.state.params, micro)).astype(np.float32)
        else:
            micro["old_logprobs"] = replay.with_trained_values(old, micro["loss_mask"])
        if self.ref_params is not None:
            micro["ref_logprobs"] = host(self.fns.logprobs(self.ref_params, micro)).astype(np.float32)
        return micro

    def train_rollout(self, step: int, until: int, bar) -> int:
        """One rollout batch: up to steps_per_rollout loop steps (not past `until`); returns the new step."""
        cfg, ctx = self.cfg, self.ctx
        trajs, roll_m = self.rollout(step)
        adv, informative, score_m = self.score(trajs)
        t0 = time.perf_counter()  # selection, expansion and old (and reference) log-probs
        sel = self.select(trajs, adv, informative)
        qids = [t.record.qid for t in trajs[:: cfg.grpo.group_size]]
        n_steps = min(cfg.grpo.steps_per_rollout, until - step)
        per_epoch = cfg.grpo.steps_per_rollout // cfg.grpo.epochs_per_rollout
        tb = cfg.grpo.train_batch_size
        micros = []
        if sel.examples:
            # Epoch 0 in selection order (already shuffled), later epochs reshuffled.
            epochs = -(-n_steps // per_epoch)
            orders = [np.arange(len(sel.examples))] + [
                self.rng.permutation(len(sel.examples)) for _ in range(epochs - 1)
            ]
            for k in range(n_steps):
                part = orders[k // per_epoch][(k % per_epoch) * tb : (k % per_epoch + 1) * tb]
                old = None if sel.old_logprobs is None else [sel.old_logprobs[i] for i in part]
                micros.append(self._micro([sel.examples[i] for i in part], sel.advantages[part], old))
        t_old = time.perf_counter() - t0
        once = {**{k: v for k, v in roll_m.items() if k.startswith("time/")}, "time/reward_s": 0.0}
        base = {**roll_m, **score_m, **sel.metrics, "time/old_logprobs_s": t_old}
        opt_before = self.opt_step
        for k in range(n_steps):
            t1 = time.perf_counter()
            step += 1
            # Time keys add up to the wall time: a rollout's own costs are booked on its first step only.
            metrics = {**base, **{key: 0.0 for key in once}, "time/old_logprobs_s": 0.0} if k else dict(base)
            if micros:
                micro = micros[k]
                ctx.state, out = self.fns.grpo_step(ctx.state, micro)
                self.opt_step += 1
                metrics.update(scalars(out, "grpo"))
                mask = micro["loss_mask"] != 0
                gap = np.abs(micro["sampler_logprobs"] - micro["old_logprobs"])[mask]
                metrics["rollout/logprob_gap"] = _mean(gap)
                metrics["throughput/train_tokens_per_s"] = float(mask.sum()) / (time.perf_counter() - t1)
            else:
                self.skipped += 1
            metrics["train/loop_step"] = float(step)
            metrics["train/optimizer_step"] = float(self.opt_step)
            metrics["train/skipped_steps"] = float(self.skipped)
            metrics["time/train_s"] = time.perf_counter() - t1
            ctx.log(step, metrics)
            ctx.samples.write(step, PHASE, qids, weight_version=self.rollouts.policy.weight_version)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/shaped']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}")
        # Checkpoints are numbered by optimizer steps and land on rollout boundaries (the config makes
        # checkpoint_every a multiple of the steps per rollout); a skipped rollout saves nothing new.
        every, s0 = cfg.log.checkpoint_every, self.sft_steps
        if step == until or (every and (self.opt_step - s0) // every > (opt_before - s0) // every):
            ctx.save(self.opt_step, *self.extra(step))
            if self.replay is not None:  # media of samples no kept checkpoint or live sample refers to
                replay_samples.collect_media(
                    self.media, self.replay.media_refs(), ctx.checkpointer, replay.ARRAYS_PREFIX
                )
        return step

    def train(self, until: int) -> None:
        """Rollout batches from the context's loop step up to loop step `until`."""
        step = int(self.ctx.start_step)
        bar = self.ctx.progress(until, "grpo")
        try:
            while step < until:
                step = self.train_rollout(step, until, bar)
        finally:
            bar.close()
        self.ctx.start_step = step
        logging.info(
            "grpo: reached loop step %d, optimizer step %d (%d steps skipped without a sample to train on)",
            step, self.opt_step, self.skipped,
        )  # fmt: skip

    def close(self) -> None:
        self.rollouts.close()


def check_supported(cfg: RunConfig) -> None:
    """Settings the config allows but this loop does not run.

    Raises:
      ConfigError: grpo.max_staleness > 0 (asynchronous rollouts).
    """
    if cfg.grpo.max_staleness:
        raise ConfigError(
            "grpo.max_staleness",
            f"this loop is synchronous (every sample comes from the current policy); got "
            f"{cfg.grpo.max_staleness}, expected 0",
        )


def run(cfg: RunConfig, *, accuracy_fn: AccuracyFn | None = None) -> pathlib.Path:
    """grpo mode: `sft.steps` warm-start SFT steps, then GRPO to the end; exports `hf_export/`.

    Loop steps count SFT steps first, so metrics, checkpoints and the resume point form one sequence.
    Returns the export folder.
    """
    check_supported(cfg)
    records = load_rl(cfg)
    sft_steps = cfg.sft.steps
    total = sft_steps + total_grpo_steps(cfg, len(records))
    ctx = RunContext.open(cfg, total, keep=cfg.log.keep_checkpoints)
    trainer = None
    try:
        if ctx.start_step < sft_steps:
            sft_records = sft.load_records(cfg)
            sft.train_sft(
                ctx,
                sft.make_fns(ctx),
                sft_records,
                until_step=sft_steps,
                checkpoint_every=cfg.sft.checkpoint_every,
            )
        trainer = GRPOTrainer(ctx, records, sft_steps, accuracy_fn)
        trainer.train(total)
        return ctx.export()
    finally:
        if trainer is not None:
            trainer.close()
        ctx.close()
