"""The GRPO loop: rolled-out, scored batches (train/grpo_rollout.py) filtered by refill or selective replay,
old and reference log-probs, clipped-objective steps, metrics, checkpoints and resume; and the grpo mode.

`run` is the grpo mode (an optional SFT warm start first); `GRPOTrainer` is the loop, usable on its own;
with grpo.max_staleness > 0 its rollouts run ahead on a worker thread (train/async_rollout.py).
Loop steps count every planned step and number the metric lines; optimizer steps count the steps that
trained and number the checkpoints and the LR schedule. A rollout without a sample to train on (no
informative group, nothing to replay) is skipped: its loop steps pass, the optimizer step does not move.
"""

import dataclasses
import pathlib
import time

import jax
import numpy as np
from absl import logging

from pixel_reasoner_jax.config import ConfigError, RunConfig
from pixel_reasoner_jax.data.records import RLRecord
from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.processing.batch import Example
from pixel_reasoner_jax.rollout.trajectory import expand_trajectory
from pixel_reasoner_jax.train import async_rollout, multihost, probe, replay, replay_samples, sft, steps
from pixel_reasoner_jax.train import state as st
from pixel_reasoner_jax.train.grpo_rollout import ROLLOUTS_DIR as ROLLOUTS_DIR  # re-exported for readers
from pixel_reasoner_jax.train.grpo_rollout import AccuracyFn, RolloutBatches, load_rl
from pixel_reasoner_jax.train.run import RunContext, host, scalars

PHASE = "grpo"
REFERENCE_DIR = "grpo_reference"


def total_grpo_steps(cfg: RunConfig, num_records: int) -> int:
    """grpo.steps, or num_episodes passes of whole rollout batches over the prompts when it is -1."""
    g = cfg.grpo
    if g.steps > 0:
        return g.steps
    return g.num_episodes * max(1, num_records // g.prompts_per_rollout) * g.steps_per_rollout


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


class GRPOTrainer(RolloutBatches):
    """Rollout -> reward -> filter -> steps, one rollout batch at a time, from the context's loop step.

    The rollout side (prompts, episodes, rewards, dumps) is the base class, train/grpo_rollout.py; this
    class selects what trains, computes old and reference log-probs, steps and checkpoints.

    Args:
      ctx: the run (its state is updated in place).
      records: the RL prompts.
      sft_steps: steps taken by the warm start (GRPO checkpoints count from there).
      accuracy_fn: trajectory -> accuracy reward; default: `grpo_rollout.default_accuracy` (reward.scoring).
    """

    def __init__(
        self, ctx: RunContext, records: list[RLRecord], sft_steps: int, accuracy_fn: AccuracyFn | None
    ):
        cfg = ctx.cfg
        self.sft_steps = sft_steps
        extra = ctx.extra if ctx.extra.get("phase") == PHASE else {}
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
        settings = steps.GRPOLossSettings.from_config(cfg.grpo, cfg.data.max_seq_len)
        self.fns = sft.make_fns(ctx, grpo=settings)
        # Loaded once, kept on device: one more log-prob pass per batch when the KL term is on.
        self.ref_params = reference_params(ctx, sft_steps) if cfg.grpo.kl_coef > 0 else None
        # The rollout side last: it opens the policy (maybe launching a server), so a failure above leaves
        # nothing to close.
        super().__init__(ctx, records, accuracy_fn, extra.get("rl_iter"))
        n_probe = cfg.log.call_probe
        self.probe = probe.call_probe_examples(
            records[:n_probe], ctx.tokenizer, self.episode_cfg, self.rollouts.processor, ctx.model_cfg
        )

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

    def select(self, trajs, adv, informative, keep: np.ndarray | None = None) -> Selection:
        """The rollout batch's training samples, or none (the steps are skipped).

        refill: informative samples repeated back to the rollout batch (the original's `--filter True`);
        ssr: half the rollout batch, fresh informative samples first, replay fills the rest (`--filter
        SSR`, `replay.SelectiveReplayBuffer.mix`); none: every trainable sample in `keep` (None: all).
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
        if keep is not None:
            pool = pool & keep
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

    def _micro(
        self, examples: list[Example], adv: np.ndarray, old: list[np.ndarray] | None, current: bool = False
    ) -> dict:
        """One step's stacked micro-batches; `current`: the params have not moved since the samples were
        drawn, so the step's own forward gives their old log-probs (no separate pass)."""
        micro = sft.make_micro(self.ctx, examples, self.cfg.grpo.micro_batches)
        micro["advantages"] = adv.astype(np.float32).reshape(micro["advantages"].shape)
        # Old log-probs from the trainer's own forward at rollout time (the policy the samples came from,
        # in the trainer's numerics); the sampler's stay in `sampler_logprobs` for TIS and the gap metric.
        if current:
            micro["old_current"][:] = 1.0
        elif old is None:
            micro["old_logprobs"] = host(self.fns.logprobs(self.ctx.state.params, micro)).astype(np.float32)
        else:
            micro["old_logprobs"] = replay.with_trained_values(old, micro["loss_mask"])
        if self.ref_params is not None:
            micro["ref_logprobs"] = host(self.fns.logprobs(self.ref_params, micro)).astype(np.float32)
        return micro

    def train_rollout(self, step: int, until: int, bar) -> int:
        """One synchronous rollout batch: rolled out now, then trained; returns the new loop step."""
        trajs, roll_m = self.rollout(step)
        return self.train_batch(step, until, bar, trajs, roll_m)

    def train_batch(self, step, until, bar, trajs, roll_m, *, keep=None, on_plan=None) -> int:
        """Scores, selects and trains one rolled-out batch: up to steps_per_rollout loop steps (not past
        `until`); returns the new loop step.

        Args:
          roll_m: the rollout's metrics; a "time/rollout_idle_s" among them is the rollout worker's idle
            time, else the rollout ran on this thread and idled for the rest of each step.
          keep: (B,) bool, the samples that may train (train/async_rollout.py drops stale ones); None: all.
          on_plan: called with whether this batch ends with a checkpoint, once that is known (after the
            selection) and before the old log-probs and the steps.
        """
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()  # the call probe reads the params the step starts from
        probe_m = {"probe/p_call": probe.p_call(self._logprobs_of(self.probe))} if self.probe else {}
        probe_m["time/probe_s"] = time.perf_counter() - t0
        adv, informative, score_m = self.score(trajs, step, keep)
        t0 = time.perf_counter()  # selection, expansion and old (and reference) log-probs
        sel = self.select(trajs, adv, informative, keep)
        qids = [t.record.qid for t in trajs[:: cfg.grpo.group_size]]
        versions = sorted({v for t in trajs for v in t.turn_versions})  # the policies that sampled
        version = versions[0] if len(versions) == 1 else versions or self.rollouts.policy.weight_version
        n_steps = min(cfg.grpo.steps_per_rollout, until - step)
        per_epoch = cfg.grpo.steps_per_rollout // cfg.grpo.epochs_per_rollout
        tb = cfg.grpo.train_batch_size
        # Checkpoints are numbered by optimizer steps and land on rollout boundaries (the config makes
        # checkpoint_every a multiple of the steps per rollout); a skipped rollout saves nothing new.
        every, s0, opt_before = cfg.log.checkpoint_every, self.sft_steps, self.opt_step
        opt_after = opt_before + (n_steps if sel.examples else 0)
        saves = step + n_steps == until or bool(
            every and (opt_after - s0) // every > (opt_before - s0) // every
        )
        if on_plan is not None:
            on_plan(saves)
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
                # The first update after a synchronous rollout sees the params that sampled: on-policy.
                current = k == 0 and old is None and cfg.grpo.max_staleness == 0
                micros.append(
                    self._micro([sel.examples[i] for i in part], sel.advantages[part], old, current)
                )
        t_old = time.perf_counter() - t0
        worker_idle = "time/rollout_idle_s" in roll_m
        once = [k for k in roll_m if k.startswith("time/")]
        once += ["time/probe_s", "time/reward_s", "time/old_logprobs_s"]
        base = {**roll_m, **probe_m, **score_m, **sel.metrics, "time/old_logprobs_s": t_old}
        for k in range(n_steps):
            t1 = time.perf_counter()
            step += 1
            # Time keys add up to the wall time: a rollout's own costs are booked on its first step only.
            metrics = {**base, **{key: 0.0 for key in once}} if k else dict(base)
            if micros:
                micro = micros[k]
                ctx.state, out = self.fns.grpo_step(ctx.state, micro)
                self.opt_step += 1
                metrics.update(scalars(out, "grpo"))
                metrics["rollout/logprob_gap"] = metrics.pop("grpo/logprob_gap")
                per_s = float(np.count_nonzero(micro["loss_mask"])) / (time.perf_counter() - t1)
                metrics["throughput/train_tokens_per_s"] = per_s
                metrics["throughput/train_tokens_per_s_per_device"] = per_s / ctx.mesh.size
            else:
                self.skipped += 1
            metrics["train/loop_step"] = float(step)
            metrics["train/optimizer_step"] = float(self.opt_step)
            metrics["train/skipped_steps"] = float(self.skipped)
            end = time.perf_counter()
            metrics["time/train_s"] = end - t1
            # The trainer's side (idle, reward, old log-probs, train) and the rollout side (rollout, push,
            # idle) each add up to the step's wall time (metrics.TRAINER_TIMES / ROLLOUT_TIMES).
            metrics["time/step_s"] = end - self._step_end
            if not worker_idle:
                busy = metrics["time/rollout_s"] + metrics["time/weight_push_s"]
                metrics["time/rollout_idle_s"] = max(0.0, metrics["time/step_s"] - busy)
            self._step_end = end
            ctx.log(step, metrics)
            ctx.samples.write(step, PHASE, qids, weight_version=version)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/shaped']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}")
        if saves:
            ctx.save(self.opt_step, *self.extra(step))
            if self.replay is not None and ctx.is_main:  # media no kept checkpoint or live sample refers to
                replay_samples.collect_media(
                    self.media, self.replay.media_refs(), ctx.checkpointer, replay.ARRAYS_PREFIX
                )
        return step

    def train(self, until: int) -> None:
        """Rollout batches from the context's loop step up to loop step `until`: synchronous, or with
        rollouts sampled ahead by a worker thread when grpo.max_staleness > 0 (train/async_rollout.py)."""
        step = int(self.ctx.start_step)
        bar = self.ctx.progress(until, "grpo")
        self._step_end = time.perf_counter()
        try:
            if self.cfg.grpo.max_staleness:
                step = async_rollout.train(self, step, until, bar)
            else:
                while step < until:
                    step = self.train_rollout(step, until, bar)
        finally:
            bar.close()
        self.ctx.start_step = step
        logging.info(
            "grpo: reached loop step %d, optimizer step %d (%d steps skipped without a sample to train on)",
            step, self.opt_step, self.skipped,
        )  # fmt: skip


def check_supported(cfg: RunConfig) -> None:
    """Settings the config allows but this loop does not run.

    Raises:
      ConfigError: grpo.max_staleness > 0 over several processes: the worker thread would issue the
        sampler's (or the weight export's) cross-host collectives in an order no other process shares;
        grpo.prompts_per_rollout not a multiple of the processes.
    """
    multihost.check(cfg)
    process_count = jax.process_count()
    if cfg.grpo.max_staleness and process_count > 1:
        raise ConfigError(
            "grpo.max_staleness",
            f"asynchronous rollouts run in one process; got {cfg.grpo.max_staleness} with {process_count} "
            f"processes, expected 0",
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
        if cfg.grpo.warm_start_fresh_moments and sft_steps and int(ctx.state.step) == sft_steps:
            # The original runs SFT and RL as two jobs: RL starts from the SFT weights with a new optimizer.
            ctx.state = st.reset_adam_moments(ctx.state)
            logging.info("GRPO starts with fresh Adam moments (grpo.warm_start_fresh_moments)")
        trainer = GRPOTrainer(ctx, records, sft_steps, accuracy_fn)
        trainer.train(total)
        return ctx.export()
    finally:
        if trainer is not None:
            trainer.close()
        ctx.close()
