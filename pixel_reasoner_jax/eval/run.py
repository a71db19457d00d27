"""The eval mode: episodes over the eval records with the eval-time limits (greedy unless told otherwise),
scored like the training reward plus ANLS, written to `workdir/eval/` as a per-sample dump and a report.

Runs the checkpoint of `model.checkpoint` (e.g. a training run's `hf_export/`) through the JaxSampler or SGLang.
"""

import dataclasses
import json
import pathlib
import time

import jax
from absl import logging

from pixel_reasoner_jax.config import ConfigError, RunConfig, rollout_mesh_shape
from pixel_reasoner_jax.data.records import load_rl_records
from pixel_reasoner_jax.eval import metrics as em
from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.episode import Episode, EpisodeConfig, load_media, run_episodes
from pixel_reasoner_jax.sharding import make_mesh, use_mesh
from pixel_reasoner_jax.train.policies import SeededPolicy, open_policy

EVAL_DIR = "eval"


def episode_config(cfg: RunConfig) -> EpisodeConfig:
    """The rollout settings with the eval section's decoding, crop and image limits (reference §5, §10)."""
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


def run(cfg: RunConfig) -> dict:
    """Evaluates `model.checkpoint` on the records of `data.eval_path` whose benchmark is in eval.benchmarks.

    Writes `workdir/eval/samples.jsonl` (one SampleResult per response), `report.json` and `report.md`.
    Returns the report (eval/metrics.aggregate).
    """
    ckpt = cfg.model.checkpoint
    wanted = set(cfg.eval.benchmark_names)
    records, report = load_rl_records(cfg.data.eval_path, cfg.data.data_root)
    report.log()
    records = [r for r in records if em.canonical_benchmark(r.benchmark) in wanted]
    if not records:
        raise ConfigError("eval.benchmarks", f"no record of {cfg.data.eval_path} belongs to {sorted(wanted)}")
    model_cfg = ModelConfig.from_pretrained(ckpt)
    processor = dataclasses.replace(
        ImageProcessorConfig.from_pretrained(ckpt),
        min_pixels=cfg.eval.model_min_pixels,
        max_pixels=cfg.eval.model_max_pixels,
    )

    def model_fn():
        data, tensor = rollout_mesh_shape(cfg.mesh, jax.device_count())
        mesh = make_mesh(data, 1, tensor)
        with use_mesh(mesh, "rollout"):
            return hf_io.load_model(ckpt, mesh=mesh, rules="rollout")

    policy, client, server = open_policy(
        cfg,
        model_cfg,
        processor,
        model_fn,
        version="eval",
        workdir=cfg.workdir,
        max_batch=cfg.eval.batch_size,
    )
    tok = QwenTokenizer.from_pretrained(ckpt)
    ep_cfg = episode_config(cfg)
    t0 = time.perf_counter()
    try:
        episodes, meta = [], []
        for rec in records:
            media = load_media(rec, ep_cfg)
            for j in range(cfg.eval.num_samples):
                episodes.append(
                    Episode.start(rec, tok, ep_cfg, None, processor, media=media, episode_id=f"{rec.qid}/{j}")
                )
                meta.append((rec, j))
        trajs = run_episodes(SeededPolicy(policy, cfg.seed, 0), episodes, max_concurrency=cfg.eval.batch_size)
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
    results = []
    for traj, (rec, j) in zip(trajs, meta):
        boxed, correct, anls = em.score_response(
            traj.response_text,
            rec.answer,
            require_boxed=cfg.reward.require_boxed,
            ended_after_failed_call=cfg.reward.zero_after_failed_call and traj.ended_after_failed_call,
        )
        results.append(
            em.SampleResult(
                qid=rec.qid, benchmark=em.canonical_benchmark(rec.benchmark), question=rec.question,
                gt=rec.answer, response=traj.response_text, boxed=boxed, correct=correct, anls=anls,
                n_calls=traj.num_calls, n_failed=traj.num_failed_calls, n_valid=traj.num_valid_calls,
                status=traj.status, sample=j, n_tokens=traj.expanded_length,
            )
        )  # fmt: skip
    out = pathlib.Path(cfg.workdir) / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    em.write_dumps(out / "samples.jsonl", results)
    result = em.aggregate(results)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    table = em.report_markdown(result, title=f"Evaluation of {ckpt}")
    (out / "report.md").write_text(table + "\n")
    logging.info("eval of %d responses in %.1f s:\n%s", len(results), time.perf_counter() - t0, table)
    return result
