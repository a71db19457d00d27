"""The GRPO loop: prompts x G episodes through a Policy, shaped rewards, group advantages, zero-advantage
filtering (refill or selective replay), old log-probs, clipped-objective steps, weight sync, metrics, resume.

`run` is the grpo mode (an optional SFT warm start first); `GRPOTrainer` is the loop, usable on its own.
"""

import base64
import dataclasses
import pathlib
import time
import zlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging

from pixel_reasoner_jax.config import ConfigError, RunConfig, rollout_mesh_shape
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
from pixel_reasoner_jax.rollout.policy import GenerationRequest, GenerationResult, Policy
from pixel_reasoner_jax.sharding import make_mesh
from pixel_reasoner_jax.train import advantages, rewards, sft, steps
from pixel_reasoner_jax.train.replay import SelectiveReplayBuffer, refill_informative
from pixel_reasoner_jax.train.run import RunContext, host, scalars

PHASE = "grpo"
PUSH_DIR = "pushed_weights"
SERVER_LOG = "server.log"
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


def request_seed(base: int, step: int, rid: str) -> int:
    """A sampling seed from (run seed, loop step, request id) alone: a resumed run draws the same tokens."""
    words = np.random.SeedSequence([base, step, zlib.crc32(rid.encode())]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) | (int(words[1]) >> 1)


class SeededPolicy(Policy):
    """Gives every request of one rollout a seed derived from its rid (`request_seed`)."""

    def __init__(self, inner: Policy, base: int, step: int):
        self.inner, self.base, self.step = inner, base, step

    @property
    def weight_version(self) -> str:
        return self.inner.weight_version

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        seeded = [dataclasses.replace(r, seed=request_seed(self.base, self.step, r.rid)) for r in requests]
        return self.inner.generate(seeded)


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
# Replay samples: Examples as JSON (the SSR buffer is checkpointed in the JSON extra)
# ---------------------------------------------------------------------------------------------------------

_ARRAY_FIELDS = [f.name for f in dataclasses.fields(Example) if f.name != "qid"]


def encode_example(ex: Example) -> dict:
    """A JSON dict holding the Example's arrays bit-exactly (base64 of the raw bytes, dtype, shape)."""
    out = {"qid": ex.qid}
    for name in _ARRAY_FIELDS:
        a = np.ascontiguousarray(getattr(ex, name))
        out[name] = [base64.b64encode(a.tobytes()).decode("ascii"), a.dtype.str, list(a.shape)]
    return out


def decode_example(d: dict) -> Example:
    arrays = {}
    for name in _ARRAY_FIELDS:
        data, dtype, shape = d[name]
        arrays[name] = np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype)).reshape(shape).copy()
    return Example(qid=d["qid"], **arrays)


# ---------------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------------


def open_policy(cfg: RunConfig, model_cfg, processor, model_fn, *, version: str, workdir, max_batch: int):
    """(policy, SGLang client or None, local server or None) for `cfg.rollout.backend`.

    Args:
      model_fn: builds the Qwen25VL the in-process sampler serves (called for backend "jax" only).
      version: the weight label of that model.
      workdir: where a launched local server writes its log.
      max_batch: episodes decoded together.
    """
    if cfg.rollout.backend == "jax":
        from pixel_reasoner_jax.rollout.sampler import JaxSampler

        data, tensor = rollout_mesh_shape(cfg.mesh, jax.device_count())
        sampler = JaxSampler(
            model_fn(),
            model_cfg,
            processor,
            max_batch=max_batch,
            seq_buckets=cfg.data.seq_buckets,
            patch_buckets=cfg.data.patch_buckets,
            decode_bucket=cfg.rollout.decode_bucket,
            mesh=make_mesh(data, 1, tensor),
            rules="rollout",
            weight_version=version,
        )
        return sampler, None, None
    from pixel_reasoner_jax.rollout.sglang_client import SGLangClient
    from pixel_reasoner_jax.serve.launch import start_local_server

    urls, server = list(cfg.rollout.urls), None
    if cfg.rollout.launch_local_server:
        url, server = start_local_server(
            cfg.model.checkpoint,
            max_batch=max_batch,
            weight_version=version,
            timeout_s=cfg.rollout.request_timeout_s,
            log_path=pathlib.Path(workdir) / SERVER_LOG,
        )
        urls.append(url)
    client = SGLangClient(urls, timeout_s=cfg.rollout.request_timeout_s, retries=cfg.rollout.retries)
    return client, client, server


class _Rollouts:
    """The run's Policy (in-process JaxSampler, or SGLang servers) and how new weights reach it."""

    def __init__(self, ctx: RunContext):
        from flax import nnx

        self.ctx = ctx

        def model_fn():
            # Copies: the train step donates the state's buffers, which must never be the sampler's.
            params = jax.tree.map(lambda x: x.copy(), ctx.state.params)
            return nnx.merge(ctx.graphdef, params, ctx.state.buffers)

        # A launched server starts from the checkpoint folder, labelled "base": the first sync pushes ours.
        version = self.version() if ctx.cfg.rollout.backend == "jax" else "base"
        self.policy, self.client, self.server = open_policy(
            ctx.cfg, ctx.model_cfg, self.processor, model_fn,
            version=version, workdir=ctx.workdir, max_batch=ctx.cfg.rollout.batch_size,
        )  # fmt: skip

    @property
    def processor(self):
        r = self.ctx.cfg.rollout
        return self.ctx.processor(r.model_min_pixels, r.model_max_pixels)

    def version(self) -> str:
        """The weight label of the current train state: optimizer updates applied."""
        return str(int(host(self.ctx.state.step)))

    def sync(self) -> None:
        """Brings the policy to the train state's weights when its version lags (after a step or resume)."""
        version = self.version()
        if self.policy.weight_version == version:
            return
        params = self.ctx.state.params
        if self.client is None:
            self.policy.update_weights(jax.tree.map(lambda x: x.copy(), params), version)
            return
        ctx = self.ctx
        self.client.push_weights(
            lambda out: hf_io.export_hf(
                params, ctx.model_cfg, out, extra_files_from=ctx.cfg.model.checkpoint
            ),
            version,
            ctx.workdir / PUSH_DIR,
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()


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
      sft_steps: loop steps taken by the warm start (GRPO checkpoints count from there).
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
            self.replay = SelectiveReplayBuffer(cfg.grpo.replay_capacity, cfg.seed)
            if extra.get("replay"):
                self.replay.load_state_dict(extra["replay"])
        self.skipped = int(extra.get("skipped_steps", 0))
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
        self.rollouts = _Rollouts(ctx)

    def extra(self) -> dict:
        out = {
            "phase": PHASE,
            "sft_iter": self.ctx.extra.get("sft_iter"),
            "rl_iter": self.it.get_state(),
            "np_rng": self.rng.bit_generator.state,
            "skipped_steps": self.skipped,
        }
        if self.replay is not None:
            out["replay"] = self.replay.state_dict()
        return out

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
            form=rw.form, alpha=rw.alpha, H=rw.H, beta=rw.beta, N=rw.N,
            curiosity=rw.curiosity, penalty=rw.penalty,
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

    def select(self, trajs, adv, informative) -> tuple[list[Example], np.ndarray]:
        """The rollout's training samples (samples_per_rollout of them) and their advantages, or empty.

        refill: informative samples repeated back to the batch size (the original's `--filter True`);
        ssr: half fresh informative, half replayed by |advantage|; none: every trainable sample.
        """
        n = self.cfg.grpo.samples_per_rollout
        mode = self.cfg.grpo.filter
        proc, mcfg = self.rollouts.processor, self.ctx.model_cfg
        cache: dict[int, Example] = {}

        def ex(i: int) -> Example:
            if i not in cache:
                cache[i] = expand_trajectory(trajs[i], proc, mcfg)
            return cache[i]

        if mode == "ssr":
            fresh = np.flatnonzero(informative)
            samples, adv_s = self.replay.mix([encode_example(ex(i)) for i in fresh], adv[fresh], n)
            return [decode_example(s) for s in samples], np.asarray(adv_s)
        pool = informative if mode == "refill" else np.array([t.trainable for t in trajs])
        idx = refill_informative(np.flatnonzero(pool).tolist(), n, self.rng)
        return [ex(i) for i in idx], adv[np.asarray(idx, np.int64)] if idx else np.zeros((0,))

    # ---------------------------------------------------------------------------------- train

    def _micro(self, examples: list[Example], adv: np.ndarray) -> dict:
        micro = sft.make_micro(self.ctx, examples, self.cfg.grpo.micro_batches)
        micro["advantages"] = adv.astype(np.float32).reshape(micro["advantages"].shape)
        # Old log-probs from the trainer's own forward at rollout time (the policy the samples came from,
        # in the trainer's numerics); the sampler's stay in `sampler_logprobs` for TIS and the gap metric.
        micro["old_logprobs"] = host(self.fns.logprobs(self.ctx.state.params, micro)).astype(np.float32)
        return micro

    def train_rollout(self, step: int, until: int) -> int:
        """One rollout batch: up to steps_per_rollout loop steps (not past `until`); returns the new step."""
        cfg, ctx = self.cfg, self.ctx
        trajs, roll_m = self.rollout(step)
        adv, informative, score_m = self.score(trajs)
        examples, adv_s = self.select(trajs, adv, informative)
        qids = [t.record.qid for t in trajs[:: cfg.grpo.group_size]]
        n_steps = min(cfg.grpo.steps_per_rollout, until - step)
        per_epoch = cfg.grpo.steps_per_rollout // cfg.grpo.epochs_per_rollout
        tb = cfg.grpo.train_batch_size
        micros = []
        t0 = time.perf_counter()
        if examples:
            # Epoch 0 in selection order (refill and SSR already shuffled), later epochs reshuffled.
            epochs = -(-n_steps // per_epoch)
            orders = [np.arange(len(examples))] + [
                self.rng.permutation(len(examples)) for _ in range(epochs - 1)
            ]
            for k in range(n_steps):
                part = orders[k // per_epoch][(k % per_epoch) * tb : (k % per_epoch + 1) * tb]
                micros.append(self._micro([examples[i] for i in part], adv_s[part]))
        t_old = time.perf_counter() - t0
        once = {**{k: v for k, v in roll_m.items() if k.startswith("time/")}, "time/reward_s": 0.0}
        base = {**roll_m, **score_m, "time/old_logprobs_s": t_old}
        for k in range(n_steps):
            t1 = time.perf_counter()
            step += 1
            # Time keys add up to the wall time: a rollout's own costs are booked on its first step only.
            metrics = {**base, **{key: 0.0 for key in once}, "time/old_logprobs_s": 0.0} if k else dict(base)
            if micros:
                micro = micros[k]
                ctx.state, out = self.fns.grpo_step(ctx.state, micro)
                metrics.update(scalars(out, "grpo"))
                mask = micro["loss_mask"] != 0
                gap = np.abs(micro["sampler_logprobs"] - micro["old_logprobs"])[mask]
                metrics["rollout/logprob_gap"] = _mean(gap)
                metrics["throughput/train_tokens_per_s"] = float(mask.sum()) / (time.perf_counter() - t1)
            else:
                self.skipped += 1
            metrics["grpo/skipped_steps"] = float(self.skipped)
            metrics["time/train_s"] = time.perf_counter() - t1
            ctx.log(step, metrics)
            ctx.samples.write(step, PHASE, qids, weight_version=self.rollouts.policy.weight_version)
            self.bar.update(1)
            self.bar.set_postfix(
                reward=f"{metrics['reward/shaped']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}"
            )
            every = cfg.log.checkpoint_every
            if step == until or (every and (step - self.sft_steps) % every == 0):
                ctx.save(step, self.extra())
        return step

    def train(self, until: int) -> None:
        """Rollout batches from the context's loop step up to loop step `until`."""
        step = int(self.ctx.start_step)
        self.bar = self.ctx.progress(until, "grpo")
        try:
            while step < until:
                step = self.train_rollout(step, until)
        finally:
            self.bar.close()
        self.ctx.start_step = step
        logging.info(
            "grpo: reached step %d (%d steps skipped without informative samples)", step, self.skipped
        )

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
