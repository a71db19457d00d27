"""The eval mode: episodes over the benchmark records with the original's eval limits, scored per sample,
appended to `workdir/eval/samples.jsonl` chunk by chunk (a killed eval resumes), then report.json/report.md.

Runs `model.checkpoint` (a released Pixel Reasoner / Qwen2.5-VL folder, or a run's `hf_export/`) through the
in-process JaxSampler (data-parallel over this process's devices) or SGLang servers. Several processes each take
their shard of the records; process 0 merges the shards' files and writes the report.
"""

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
from absl import logging

from pixel_reasoner_jax import metrics as progress_metrics
from pixel_reasoner_jax.config import ConfigError, RunConfig, rollout_mesh_shape
from pixel_reasoner_jax.data.benchmarks import load_eval_records
from pixel_reasoner_jax.data.records import BadMediaError
from pixel_reasoner_jax.eval import metrics as em
from pixel_reasoner_jax.eval import report as er
from pixel_reasoner_jax.eval.rows import SAMPLES, media_error_row, score_trajectory
from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.episode import Episode, EpisodeConfig, load_media, run_episodes
from pixel_reasoner_jax.rollout.policy import Policy
from pixel_reasoner_jax.sharding import make_mesh, use_mesh
from pixel_reasoner_jax.train.policies import SeededPolicy, open_policy

EVAL_DIR = "eval"
PARTS_DIR = "parts"  # one samples file per process when several run
MERGE_POLL_S = 10.0


def episode_config(cfg: RunConfig) -> EpisodeConfig:
    """The rollout settings with the eval section's decoding, token limits, crop and image limits (§3.1, §5, §10)."""
    e, d = cfg.eval, cfg.data
    base = EpisodeConfig.from_rollout(cfg.rollout)
    select = (base.ops.select_min_pixels, base.ops.select_max_pixels) if e.resize_selected else (None, None)
    ops = dataclasses.replace(
        base.ops,
        crop_min_pixels=e.crop_min_pixels,
        crop_max_pixels=e.crop_max_pixels,
        select_min_pixels=select[0],
        select_max_pixels=select[1],
    )
    temperature = 0.0 if e.greedy else e.temperature
    return dataclasses.replace(
        base,
        max_new_tokens=e.max_new_tokens,
        max_total_tokens=e.max_total_tokens,
        call_token_limit=e.call_token_limit,
        temperature=temperature,
        temperature_after_tool=temperature,
        top_p=1.0 if e.greedy else base.top_p,
        top_k=-1 if e.greedy else base.top_k,
        ops=ops,
        original_min_pixels=d.eval_image_min_pixels,
        original_max_pixels=d.eval_image_max_pixels,
        video_min_pixels=min(d.eval_image_min_pixels, d.video_frame_max_pixels),
        video_max_pixels=d.video_frame_max_pixels,
        num_video_frames=d.num_video_frames,
    )


def shard(items: Sequence, index: int, count: int) -> list:
    """Process `index` of `count` takes every count-th item from its index (disjoint, covering)."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} outside [0, {count})")
    return list(items[index::count])


# ---------------------------------------------------------------------------------------------------------
# The resumable loop
# ---------------------------------------------------------------------------------------------------------


def _own_file(out: pathlib.Path, index: int, count: int) -> pathlib.Path:
    return out / SAMPLES if count == 1 else out / PARTS_DIR / f"samples.{index:05d}-of-{count:05d}.jsonl"


def _all_rows(out: pathlib.Path, own: pathlib.Path | None = None) -> dict[tuple[str, int], em.SampleResult]:
    """Every finished row in the eval folder's sample files, by (qid, sample); `own` is repaired first."""
    files = [out / SAMPLES, *sorted((out / PARTS_DIR).glob("samples.*.jsonl"))]
    rows = {}
    for f in files:
        if f.is_file():
            for r in er.read_dumps(f, tail="cut" if f == own else "skip"):
                rows.setdefault((r.qid, r.sample), r)
    return rows


def evaluate(
    cfg: RunConfig,
    records: Sequence,
    policy: Policy | Callable[[], Policy],
    tok: QwenTokenizer,
    processor: ImageProcessorConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    title: str | None = None,
) -> dict | None:
    """Runs this process's shard of (record, sample) pairs not yet in the eval folder, appending each chunk of
    eval.batch_size rows as it finishes; process 0 then merges every process's rows and writes the report.

    Args:
      policy: the sampler, or a function that opens it (called only when something is left to run).

    Returns:
      The report (eval/report.aggregate) on process 0, None elsewhere.
    """
    out = pathlib.Path(cfg.workdir) / EVAL_DIR
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    own = _own_file(out, process_index, process_count)
    keys = [(rec, j) for rec in records for j in range(cfg.eval.num_samples)]
    done = _all_rows(out, own)
    pending = [(rec, j) for rec, j in shard(keys, process_index, process_count) if (rec.qid, j) not in done]
    ep_cfg, bs = episode_config(cfg), cfg.eval.batch_size
    if pending and not isinstance(policy, Policy):
        policy = policy()
    seeded = SeededPolicy(policy, cfg.seed, 0)  # seeds from the rid (qid/sample): chunking changes nothing
    bar = progress_metrics.progress(len(pending), desc=f"eval p{process_index}", enabled=cfg.log.progress)
    t0, media_of = time.perf_counter(), {}
    for start in range(0, len(pending), bs):
        rows, episodes, meta = [], [], []
        for rec, j in pending[start : start + bs]:
            try:
                if rec.qid not in media_of:
                    media_of = {rec.qid: load_media(rec, ep_cfg)}  # a query's samples are adjacent
                ep = Episode.start(
                    rec, tok, ep_cfg, None, processor, media=media_of[rec.qid], episode_id=f"{rec.qid}/{j}"
                )
            except (BadMediaError, ValueError, OSError) as e:  # a broken record is counted and skipped
                logging.warning("eval: skipping %s sample %d: %s", rec.qid, j, e)
                rows.append(media_error_row(rec, j, e))
                continue
            episodes.append(ep)
            meta.append(j)
        trajs = run_episodes(seeded, episodes, max_concurrency=bs) if episodes else []
        rows += [
            score_trajectory(t, j, tok, out, cfg.eval.scoring, cfg.reward.require_boxed)
            for t, j in zip(trajs, meta)
        ]
        er.append_dumps(own, rows)
        bar.update(len(rows))
    bar.close()
    logging.info("eval p%d: %d samples in %.1f s", process_index, len(pending), time.perf_counter() - t0)
    if process_index != 0:
        return None
    wanted = {(rec.qid, j) for rec, j in keys}
    while not wanted <= set(rows := _all_rows(out, own if process_count == 1 else None)):
        missing = len(wanted - set(rows))
        logging.info("eval: waiting for the other processes' %d samples (rerun resumes if one died)", missing)
        time.sleep(MERGE_POLL_S)
    merged = [rows[(rec.qid, j)] for rec, j in keys]  # the records' order
    er.write_dumps(out / SAMPLES, merged)
    result = er.aggregate(merged)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    ckpt = cfg.model.checkpoint
    table = er.report_markdown(
        result, title=title or f"Evaluation of {ckpt}", paper_model=er.paper_model_for(ckpt)
    )
    (out / "report.md").write_text(table)
    logging.info("eval report:\n%s", table)
    return result


# ---------------------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------------------


def open_eval_policy(cfg: RunConfig, model_cfg, processor) -> tuple[Policy, Callable[[], None]]:
    """(policy, close) for cfg.rollout.backend: the JaxSampler over THIS process's devices (each process
    evaluates its own shard, so the model is replicated per process), or the SGLang servers."""
    ckpt = cfg.model.checkpoint
    if cfg.rollout.backend == "jax":
        from pixel_reasoner_jax.rollout.sampler import JaxSampler  # imported here: SGLang-only runs skip it

        devices = jax.local_devices()
        data, tensor = rollout_mesh_shape(cfg.mesh, len(devices))
        mesh = make_mesh(data, 1, tensor, devices=devices)
        # Eval holds no optimizer: weights load in the compute dtype (the original's vLLM served bf16).
        with use_mesh(mesh, "rollout"):
            model = hf_io.load_model(
                ckpt, dtype=cfg.model.dtype, param_dtype=cfg.model.dtype, mesh=mesh, rules="rollout",
                attention=cfg.model.attention,
            )  # fmt: skip
        sampler = JaxSampler(
            model, model_cfg, processor, max_batch=-(-cfg.eval.batch_size // data) * data,
            seq_buckets=cfg.data.seq_buckets, patch_buckets=cfg.data.patch_buckets,
            decode_bucket=cfg.rollout.decode_bucket, mesh=mesh, rules="rollout", weight_version="eval",
        )  # fmt: skip
        return sampler, lambda: None
    policy, client, server = open_policy(
        cfg, model_cfg, processor, None, version="eval", workdir=cfg.workdir, max_batch=cfg.eval.batch_size
    )

    def close():
        if client is not None:
            client.close()
        if server is not None:
            server.stop()

    return policy, close


def run(cfg: RunConfig) -> dict | None:
    """Evaluates `model.checkpoint` on the records of `data.eval_path` whose benchmark is in eval.benchmarks.

    Writes `workdir/eval/samples.jsonl` (one row per response, with its conversation and media under
    `workdir/eval/media/`), `report.json` and `report.md`. Returns the report on process 0.
    """
    ckpt = cfg.model.checkpoint
    wanted = set(cfg.eval.benchmark_names)
    records, data_report = load_eval_records(cfg.data.eval_path, cfg.data.data_root)
    data_report.log()
    records = [r for r in records if em.canonical_benchmark(r.benchmark) in wanted]
    if not records:
        raise ConfigError("eval.benchmarks", f"no record of {cfg.data.eval_path} belongs to {sorted(wanted)}")
    processor = dataclasses.replace(
        ImageProcessorConfig.from_pretrained(ckpt),
        min_pixels=cfg.eval.model_min_pixels,
        max_pixels=cfg.eval.model_max_pixels,
    )
    closers = []

    def policy_fn() -> Policy:
        policy, close = open_eval_policy(cfg, ModelConfig.from_pretrained(ckpt), processor)
        closers.append(close)
        return policy

    try:
        return evaluate(
            cfg, records, policy_fn, QwenTokenizer.from_pretrained(ckpt), processor,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
    finally:
        for close in closers:
            close()
