"""The SFT loop: resumable grain order over trajectories, micro-batched steps, metrics, checkpoints, export.

`train_sft` runs SFT steps up to a loop step (also the warm start of a GRPO run); `run` is the sft mode.
"""

import math
import time

import numpy as np
from absl import logging

from pixel_reasoner_jax.config import RunConfig
from pixel_reasoner_jax.data import loader
from pixel_reasoner_jax.data.records import SFTRecord, load_sft_records
from pixel_reasoner_jax.data.sft_examples import SFT_VIDEO_MIN_PIXELS, sft_example
from pixel_reasoner_jax.processing.batch import Example
from pixel_reasoner_jax.train import steps
from pixel_reasoner_jax.train.run import RunContext, scalars

PHASE = "sft"


def load_records(cfg: RunConfig) -> list[SFTRecord]:
    """The SFT trajectories of `data.sft_path` (bad rows are counted, logged and skipped)."""
    records, report = load_sft_records(cfg.data.sft_path, cfg.data.data_root)
    report.log()
    return records


def steps_per_epoch(cfg: RunConfig, num_records: int) -> int:
    return max(1, math.ceil(num_records / cfg.sft.batch_size))


def total_steps(cfg: RunConfig, num_records: int) -> int:
    """sft.steps, or epochs * ceil(records / batch_size) when it is -1."""
    return cfg.sft.steps if cfg.sft.steps > 0 else cfg.sft.epochs * steps_per_epoch(cfg, num_records)


def make_iterator(cfg: RunConfig, records: list[SFTRecord], state: dict | None):
    """An endless, per-epoch reshuffled stream of records, positioned at `state` when resuming.

    Every process reads the same global stream: `steps.shard_batch` places each process's addressable
    part of the full global batch, so all processes must hold the same batch.
    """
    ds = loader.sft_dataset(
        records, cfg.data.seed, num_epochs=None, process_index=0, process_count=1, load_media=False
    )
    it = loader.make_iterator(ds)
    if state:
        it.set_state(state)
    return it


def example(ctx: RunContext, record: SFTRecord) -> Example:
    d = ctx.cfg.data
    return sft_example(
        record,
        ctx.tokenizer,
        ctx.processor(d.sft_image_min_pixels, d.sft_image_max_pixels),
        ctx.model_cfg,
        mask_mode=d.sft_loss_mask,
        # The SFT video floor (128*784) must not exceed the configured per-frame cap (tiny runs cap lower).
        video_min_pixels=min(SFT_VIDEO_MIN_PIXELS, d.sft_video_frame_max_pixels),
        video_max_pixels=d.sft_video_frame_max_pixels,
        num_video_frames=d.num_video_frames,
    )


def make_micro(ctx: RunContext, examples: list[Example], n_micro: int) -> dict:
    """Stacked micro-batches of `examples` at the config's buckets (host NumPy)."""
    batches = steps.micro_batches(
        examples,
        n_micro,
        pad_id=ctx.tokenizer.endoftext,
        vision_cfg=ctx.model_cfg.vision,
        seq_buckets=ctx.cfg.data.seq_buckets,
        patch_buckets=ctx.cfg.data.patch_buckets,
    )
    m = ctx.cfg.model
    return steps.stack(batches, logprob_chunk=m.logprob_chunk, bucket_steps=m.logprob_bucket_steps)


def train_sft(
    ctx: RunContext,
    fns: steps.TrainFns,
    records: list[SFTRecord],
    *,
    until_step: int,
    checkpoint_every: int,
    extra: dict | None = None,
) -> None:
    """SFT steps from the current loop step (`ctx.start_step` or later) up to `until_step`.

    Checkpoints every `checkpoint_every` loop steps (0 = none) and at `until_step`; each carries the data
    iterator's position so a resume continues the same order.

    Args:
      extra: more JSON entries for every checkpoint (the GRPO run's own state).
    """
    cfg = ctx.cfg
    step = int(ctx.start_step)
    if step >= until_step:
        return
    it = make_iterator(cfg, records, ctx.extra.get("sft_iter"))
    bar = ctx.progress(until_step, "sft")
    while step < until_step:
        t0 = time.perf_counter()
        batch = [next(it) for _ in range(cfg.sft.batch_size)]
        examples = [example(ctx, r) for r in batch]
        micro = make_micro(ctx, examples, cfg.sft.micro_batches)
        t_data = time.perf_counter() - t0
        ctx.state, out = fns.sft_step(ctx.state, micro)
        metrics = scalars(out, "sft")
        step += 1
        dt = time.perf_counter() - t0
        n_tokens = int(np.sum(micro["attention_mask"]))
        metrics.update(
            {
                "throughput/sft_tokens_per_s": n_tokens / dt,
                "time/data_s": t_data,
                "time/train_s": dt - t_data,
            }
        )
        ctx.log(step, metrics)
        ctx.samples.write(step, PHASE, [r.qid for r in batch])
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}")
        if step == until_step or (checkpoint_every and step % checkpoint_every == 0):
            ctx.save(step, {"phase": PHASE, "sft_iter": it.get_state(), **(extra or {})})
    bar.close()
    logging.info("sft: reached step %d", step)
    ctx.start_step = step
    ctx.extra = {**ctx.extra, "sft_iter": it.get_state()}


def make_fns(ctx: RunContext, grpo=None) -> steps.TrainFns:
    return steps.make_train_fns(
        ctx.graphdef,
        ctx.optimizer,
        ctx.shardings,
        ctx.mesh,
        logprob_chunk=ctx.cfg.model.logprob_chunk,
        grpo=grpo,
        schedule=ctx.schedule,
        frozen=ctx.frozen,
        buffers=ctx.state.buffers,
        # Pixels reach the device in the compute dtype the vision tower casts them to anyway.
        pixel_dtype=ctx.cfg.model.dtype,
    )


def run(cfg: RunConfig) -> None:
    """sft mode: train, checkpoint (sft.checkpoint_every, 0 = once per epoch), export `hf_export/`."""
    records = load_records(cfg)
    total = total_steps(cfg, len(records))
    ctx = RunContext.open(cfg, total, keep=cfg.sft.keep_checkpoints)
    every = cfg.sft.checkpoint_every or steps_per_epoch(cfg, len(records))
    try:
        train_sft(ctx, make_fns(ctx), records, until_step=total, checkpoint_every=every)
        ctx.export()
    finally:
        ctx.close()
