"""Trainer view of rollouts and SFT records: expanded ids, masks, pixels, M-RoPE positions, padded batches.

`expand_trajectory` and `sft_example` build one `Example`; `collate` pads examples to sequence and patch
buckets and adds the shifted targets and the vision-tower index arrays.

Alignment convention of a `Batch` (the "prediction" alignment): the model's output at position t predicts
`targets[:, t] = input_ids[:, t + 1]`, and `loss_mask[:, t]`, `sampler_logprobs[:, t]` and `old_logprobs[:, t]`
all describe that target token t + 1. So `models.qwen25vl.token_logprobs(model, hidden, batch.targets)` lines
up with every mask and log-prob array without further shifting. An `Example` is in TOKEN alignment instead:
its loss_mask[t] and logprobs[t] describe input_ids[t] itself.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pixel_reasoner_jax.data.records import SFTRecord, assistant_turn_mask, load_image, load_video_frames
from pixel_reasoner_jax.models.config import ModelConfig, VisionConfig
from pixel_reasoner_jax.models.vision import VisionInputs, prepare_vision
from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.processing.rope import get_rope_index
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import (
    ImageProcessorConfig,
    preprocess_image,
    preprocess_video,
    resize_to_limits,
)
from pixel_reasoner_jax.rollout.policy import Video
from pixel_reasoner_jax.rollout.trajectory import Trajectory, resize_video_frames
from pixel_reasoner_jax.tools.ops import PIX

# SFT video frames (reference §5): the SFT code caps each frame at 420*360 px; qwen_vl_utils' video floor.
SFT_VIDEO_MIN_PIXELS = 128 * PIX
SFT_VIDEO_MAX_PIXELS = 420 * 360


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence, expanded (each pad run holds its grid's token count), in token alignment.

    Attributes:
      input_ids: (T,) int32.
      loss_mask: (T,) int8, 1 where token t is trained.
      logprobs: (T,) float32 sampler log-prob of token t (0.0 where it was not sampled).
      positions: (3, T) int32 M-RoPE positions.
      pixel_values: (P, C) float32 patch rows of every vision item, items in pad order.
      grid_thw: (N, 3) int64 grids of the items, in pad order.
      is_video: (N,) bool.
      second_per_grid_ts: (V,) float32, one per video item, in order.
      vision_spans: (N, 2) int64 [start, end) of each item's pad run in input_ids.
      qid: the record's id (for error messages and logs).
      temperatures: (T,) float32 the sampling temperature of token t (1.0 where it was not sampled or was
        drawn greedily); None = 1.0 everywhere (SFT data).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    positions: np.ndarray
    pixel_values: np.ndarray
    grid_thw: np.ndarray
    is_video: np.ndarray
    second_per_grid_ts: np.ndarray
    vision_spans: np.ndarray
    qid: str = ""
    temperatures: np.ndarray | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclasses.dataclass(frozen=True)
class Batch:
    """Padded NumPy arrays of B examples in prediction alignment (see the module docstring).

    Attributes:
      input_ids: (B, T) int32, padded with pad_id.
      targets: (B, T) int32, input_ids shifted left by one (pad_id in the last column).
      positions: (3, B, T) int32 M-RoPE positions (1 on padding, as get_rope_index).
      attention_mask: (B, T) int32, 1 on real tokens.
      loss_mask: (B, T) float32, 1 where targets[:, t] is trained.
      sampler_logprobs: (B, T) float32 the sampler's log-prob of targets[:, t] (0 where not sampled).
      temperatures: (B, T) float32 the sampling temperature of targets[:, t] (1.0 where not sampled).
      old_logprobs: (B, T) float32, a copy of sampler_logprobs until the trainer recomputes them.
      advantages: (B,) float32 zeros, filled by the trainer.
      pixel_values: (Pb, C) float32, rows of every item of the batch in flat (row-major B, T) pad order,
        zero-padded to the patch bucket; None for a batch without vision items.
      vision_inputs: models.vision.prepare_vision of the batch's grids at the patch bucket; None likewise.
      grid_thw: (N, 3) int64 every item's grid in flat pad order.
      lengths: (B,) int32 real tokens per row.
      num_tokens: real tokens in the batch.
      num_loss_tokens: trained target tokens in the batch.
      truncated: (B,) bool, rows cut to fit the largest sequence bucket.
    """

    input_ids: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    sampler_logprobs: np.ndarray
    temperatures: np.ndarray
    old_logprobs: np.ndarray
    advantages: np.ndarray
    pixel_values: np.ndarray | None
    vision_inputs: VisionInputs | None
    grid_thw: np.ndarray
    lengths: np.ndarray
    num_tokens: int
    num_loss_tokens: int
    truncated: np.ndarray


# ------------------------------------------------------------------------------------------ pixels


def media_pixels(
    item: Image.Image | Video, proc_cfg: ImageProcessorConfig
) -> tuple[np.ndarray, np.ndarray, float]:
    """pixel_values, grid_thw and second_per_grid (0.0 for an image) of an item already at its final size.

    The item is never resized again: the sampler saw exactly these pixels. The processor limits are widened
    to the item's own area so smart_resize is the identity (sides are multiples of 28 already).

    Raises:
      ValueError: a side is not a multiple of patch * merge (the item was not resized to a final size).
    """
    frames = item.frames if isinstance(item, Video) else (item,)
    w, h = frames[0].size
    if w % proc_cfg.factor or h % proc_cfg.factor:
        raise ValueError(
            f"media item is {w}x{h}; a final size has sides that are multiples of {proc_cfg.factor}"
        )
    area = w * h
    cfg = dataclasses.replace(
        proc_cfg, min_pixels=min(proc_cfg.min_pixels, area), max_pixels=max(proc_cfg.max_pixels, area)
    )
    if isinstance(item, Video):
        return preprocess_video(list(frames), cfg, item.fps)
    pv, grid = preprocess_image(item, cfg)
    return pv, grid, 0.0


def _check_sizes(proc_cfg: ImageProcessorConfig, model_cfg: ModelConfig) -> None:
    v = model_cfg.vision
    got = (proc_cfg.patch_size, proc_cfg.merge_size, proc_cfg.temporal_patch_size)
    want = (v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
    if got != want:
        raise ValueError(
            f"processor (patch, merge, temporal) = {got} differs from the model's vision config {want}"
        )


def build_example(
    ids, mask, logprobs, media: Sequence[Image.Image | Video], proc_cfg, model_cfg, qid: str
) -> Example:
    """Expanded Example from collapsed ids (one pad per item) and the items at their final size."""
    _check_sizes(proc_cfg, model_cfg)
    rows, grids, secs = [], [], []
    for item in media:
        pv, grid, sec = media_pixels(item, proc_cfg)
        rows.append(pv)
        grids.append(grid)
        if isinstance(item, Video):
            secs.append(sec)
    is_video = np.array([isinstance(m, Video) for m in media], dtype=bool)
    grid_thw = np.asarray(grids, np.int64).reshape(-1, 3)
    kw = dict(
        image_pad=model_cfg.image_token_id,
        video_pad=model_cfg.video_token_id,
        merge_size=model_cfg.vision.spatial_merge_size,
    )
    images, videos = grid_thw[~is_video], grid_thw[is_video]
    try:
        ids_x, mask_x = chat.expand_pads(ids, mask, images, videos, **kw)
        _, lp_x = chat.expand_pads(ids, np.asarray(logprobs, np.float32), images, videos, **kw)
    except ValueError as e:
        raise ValueError(f"sample {qid!r}: {e}") from e
    positions, _ = get_rope_index(
        ids_x,
        image_grid_thw=images,
        video_grid_thw=videos,
        second_per_grid_ts=np.asarray(secs, np.float64) if secs else None,
        spatial_merge_size=model_cfg.vision.spatial_merge_size,
        tokens_per_second=model_cfg.vision.tokens_per_second,
        image_token_id=model_cfg.image_token_id,
        video_token_id=model_cfg.video_token_id,
    )
    is_pad = np.isin(ids_x, (model_cfg.image_token_id, model_cfg.video_token_id)).astype(np.int8)
    edges = np.diff(np.concatenate([[0], is_pad, [0]]))
    spans = np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1).astype(np.int64)
    patch_dim = proc_cfg.patch_dim
    return Example(
        input_ids=ids_x.astype(np.int32),
        loss_mask=mask_x.astype(np.int8),
        logprobs=lp_x.astype(np.float32),
        positions=positions[:, 0],
        pixel_values=np.concatenate(rows) if rows else np.zeros((0, patch_dim), np.float32),
        grid_thw=grid_thw,
        is_video=is_video,
        second_per_grid_ts=np.asarray(secs, np.float32),
        vision_spans=spans.reshape(-1, 2),
        qid=qid,
    )


def expand_trajectory(traj: Trajectory, proc_cfg: ImageProcessorConfig, model_cfg: ModelConfig) -> Example:
    """The trainer's view of a rollout: each pad expanded to its grid's count, mask and log-probs repeated
    with it (pads are never sampled, so they stay 0), pixels of every item, M-RoPE over the whole sequence.

    Raises:
      ValueError: the trajectory is not trainable (aborted, invalid tokens), or its grids disagree with
        its media.
    """
    qid = getattr(traj.record, "qid", traj.episode_id)
    if not traj.trainable:
        raise ValueError(f"trajectory {traj.episode_id!r} has status {traj.status!r}, which is not trainable")
    ex = build_example(traj.input_ids, traj.loss_mask, traj.logprobs, traj.media, proc_cfg, model_cfg, qid)
    if not np.array_equal(ex.grid_thw, traj.grids):
        raise ValueError(
            f"trajectory {traj.episode_id!r}: media give grids {ex.grid_thw.tolist()} but the episode "
            f"recorded {traj.grids.tolist()}"
        )
    # Each sampled token's temperature (greedy turns read 1.0: their log-probs are of the raw logits).
    # Sampled turns hold no pads: a turn moves right by the extra pads of the items before it.
    extra = np.concatenate([[0], np.cumsum(ex.vision_spans[:, 1] - ex.vision_spans[:, 0] - 1)]).astype(int)
    collapsed_pads = ex.vision_spans[:, 0] - extra[:-1]
    temps = np.ones(ex.length, np.float32)
    for turn in traj.turns:
        start = turn.start + extra[int(np.searchsorted(collapsed_pads, turn.start))]
        temps[start : start + turn.end - turn.start] = turn.temperature if turn.temperature > 0 else 1.0
    return dataclasses.replace(ex, temperatures=temps)


# ------------------------------------------------------------------------------------------ SFT


def encode_messages(
    tok: QwenTokenizer,
    messages: Sequence[Mapping[str, Any]],
    media: Sequence[Image.Image | Video],
    proc_cfg: ImageProcessorConfig,
    model_cfg: ModelConfig,
    *,
    assistant_loss: Sequence[bool] | None = None,
    qid: str = "",
) -> Example:
    """Example of a finished conversation whose vision items are `media` (final sizes, in item order).

    Args:
      assistant_loss: per assistant message, whether it is trained (None = all).
    """
    is_video = [isinstance(m, Video) for m in media]
    try:
        grids = [media_pixels(m, proc_cfg)[1] for m in media]
        enc = chat.encode_conversation(
            tok,
            messages,
            image_grids=[g for g, v in zip(grids, is_video) if not v],
            video_grids=[g for g, v in zip(grids, is_video) if v],
            add_generation_prompt=False,
            expand=False,
            assistant_loss=assistant_loss,
            merge_size=proc_cfg.merge_size,
        )
    except ValueError as e:
        raise ValueError(f"sample {qid!r}: {e}") from e
    order = [s.kind == chat.VIDEO for s in enc.slots]
    if order != is_video:
        raise ValueError(f"sample {qid!r}: media kinds {is_video} (is_video) differ from the items {order}")
    zeros = np.zeros(enc.input_ids.shape, np.float32)
    return build_example(enc.input_ids, enc.loss_mask, zeros, media, proc_cfg, model_cfg, qid)


def sft_example(
    record: SFTRecord,
    tok: QwenTokenizer,
    proc_cfg: ImageProcessorConfig,
    model_cfg: ModelConfig,
    *,
    mask_mode: str = "final_turns",
    video_min_pixels: int = SFT_VIDEO_MIN_PIXELS,
    video_max_pixels: int = SFT_VIDEO_MAX_PIXELS,
    video_fps: float = 2.0,
    num_video_frames: int = 16,
) -> Example:
    """Example of an SFT trajectory; loss mask from data.records.assistant_turn_mask(messages, mask_mode).

    Images are resized into the processor's limits; a video item (a list of frame paths, all used, or a
    video file / frame folder sampled to `num_video_frames`) is resized into the video limits at `video_fps`.
    """
    try:
        media = _sft_media(record, proc_cfg, video_min_pixels, video_max_pixels, video_fps, num_video_frames)
        turn_mask = assistant_turn_mask(record.messages, mask_mode)
    except (ValueError, OSError) as e:  # unreadable media, a bad mode: name the sample
        raise ValueError(f"sample {record.qid!r}: {e}") from e
    loss = [m for m, msg in zip(turn_mask, record.messages) if msg.get("role") == "assistant"]
    return encode_messages(
        tok, record.messages, media, proc_cfg, model_cfg, assistant_loss=loss, qid=record.qid
    )


def _sft_media(
    record: SFTRecord, proc_cfg, video_min_pixels, video_max_pixels, video_fps, num_video_frames
) -> list[Image.Image | Video]:
    """The record's vision items in order, at their final sizes."""
    media: list[Image.Image | Video] = []
    for msg in record.messages:
        content = msg.get("content")
        for item in content if isinstance(content, list) else ():
            # SFTRecord content items are normalised: each has "type" text, image or video.
            kind = item.get("type") if isinstance(item, Mapping) else "text"
            if kind == chat.IMAGE:
                img = load_image(item["image"])
                media.append(resize_to_limits(img, proc_cfg.min_pixels, proc_cfg.max_pixels, proc_cfg.factor))
            elif kind == chat.VIDEO:
                src = item["video"]
                frames = (
                    [load_image(p) for p in src]
                    if isinstance(src, list)
                    else load_video_frames(src, num_video_frames)
                )
                frames = resize_video_frames(frames, video_min_pixels, video_max_pixels, proc_cfg.factor)
                media.append(Video(frames=frames, fps=video_fps))
    return media


# ------------------------------------------------------------------------------------------ collate


def pick_bucket(n: int, buckets: Sequence[int] | None) -> int | None:
    """Smallest bucket >= n; with buckets None the next power of two (>= 1). None when none fits."""
    if buckets is None:
        return 1 << max(0, int(n) - 1).bit_length()
    fits = [b for b in buckets if b >= n]
    return min(fits) if fits else None


def truncate_example(ex: Example, max_len: int) -> Example:
    """The first `max_len` tokens, cut before any vision block the cut would split (its <|vision_start|>,
    one token before its pads); vision items past the cut are dropped with their pixel rows.

    M-RoPE positions of a prefix do not depend on what follows, so they are sliced, not recomputed.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    cut = min(max_len, ex.length)
    for start, end in ex.vision_spans.tolist():
        if start - 1 < cut <= end:  # the cut falls inside <|vision_start|> pads... <|vision_end|>
            cut = start - 1
    keep = int((ex.vision_spans[:, 1] < cut).sum()) if len(ex.vision_spans) else 0
    rows = int(ex.grid_thw[:keep].prod(axis=1).sum()) if keep else 0
    return dataclasses.replace(
        ex,
        input_ids=ex.input_ids[:cut],
        loss_mask=ex.loss_mask[:cut],
        logprobs=ex.logprobs[:cut],
        temperatures=None if ex.temperatures is None else ex.temperatures[:cut],
        positions=ex.positions[:, :cut],
        pixel_values=ex.pixel_values[:rows],
        grid_thw=ex.grid_thw[:keep],
        is_video=ex.is_video[:keep],
        second_per_grid_ts=ex.second_per_grid_ts[: int(ex.is_video[:keep].sum())],
        vision_spans=ex.vision_spans[:keep],
    )


def collate(
    examples: Sequence[Example],
    *,
    pad_id: int,
    vision_cfg: VisionConfig,
    seq_buckets: Sequence[int] | None = None,
    patch_buckets: Sequence[int] | None = None,
    window_bucket: int | None = None,
    truncate: bool = False,
) -> Batch:
    """Pads examples into one Batch; T and the patch rows go to the smallest bucket that fits.

    Args:
      examples: at least one Example.
      pad_id: id of padding tokens (input_ids and the last target column).
      vision_cfg: the vision tower config, for prepare_vision.
      seq_buckets, patch_buckets: allowed sizes; None = powers of two. Patch buckets must be multiples of
        spatial_merge_size**2.
      window_bucket: attention windows to pad to (None = the next power of two of the need).
      truncate: a sequence longer than the largest seq bucket is cut (truncate_example) instead of raising.

    Raises:
      ValueError: no examples; a sequence longer than the largest bucket (naming the sample) without
        truncate; more patch rows than the largest patch bucket.
    """
    if not examples:
        raise ValueError("collate needs at least one example, got none")
    limit = None if seq_buckets is None else max(seq_buckets)
    cut = np.zeros(len(examples), bool)
    exs = list(examples)
    for i, ex in enumerate(exs):
        if limit is not None and ex.length > limit:
            if not truncate:
                raise ValueError(
                    f"sample {i} ({ex.qid!r}) has {ex.length} tokens, more than the largest sequence bucket "
                    f"{limit}; pass truncate=True to cut it"
                )
            exs[i], cut[i] = truncate_example(ex, limit), True
    b = len(exs)
    t = pick_bucket(max(ex.length for ex in exs), seq_buckets)
    input_ids = np.full((b, t), pad_id, np.int32)
    positions = np.ones((3, b, t), np.int32)
    attention = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.float32)
    logprobs = np.zeros((b, t), np.float32)
    temperatures = np.ones((b, t), np.float32)
    for i, ex in enumerate(exs):
        n = ex.length
        input_ids[i, :n] = ex.input_ids
        positions[:, i, :n] = ex.positions
        attention[i, :n] = 1
        # Prediction alignment: column t describes token t + 1.
        mask[i, : n - 1] = ex.loss_mask[1:]
        logprobs[i, : n - 1] = ex.logprobs[1:]
        if ex.temperatures is not None:
            temperatures[i, : n - 1] = ex.temperatures[1:]
    targets = np.full((b, t), pad_id, np.int32)
    targets[:, :-1] = input_ids[:, 1:]
    grid_thw = np.concatenate([ex.grid_thw for ex in exs]).reshape(-1, 3).astype(np.int64)
    n_patches = sum(ex.num_patches for ex in exs)
    pixel_values = vision_inputs = None
    if n_patches:
        pb = pick_bucket(n_patches, patch_buckets)
        if pb is None:
            raise ValueError(
                f"the batch has {n_patches} patch rows, more than the largest patch bucket {max(patch_buckets)} "
                f"(per sample: {[ex.num_patches for ex in exs]})"
            )
        rows = np.concatenate([ex.pixel_values for ex in exs])
        pixel_values = np.zeros((pb, rows.shape[1]), np.float32)
        pixel_values[:n_patches] = rows
        vision_inputs = prepare_vision(grid_thw, vision_cfg, patch_bucket=pb, window_bucket=window_bucket)
    return Batch(
        input_ids=input_ids,
        targets=targets,
        positions=positions,
        attention_mask=attention,
        loss_mask=mask,
        sampler_logprobs=logprobs,
        temperatures=temperatures,
        old_logprobs=logprobs.copy(),
        advantages=np.zeros((b,), np.float32),
        pixel_values=pixel_values,
        vision_inputs=vision_inputs,
        grid_thw=grid_thw,
        lengths=np.array([ex.length for ex in exs], np.int32),
        num_tokens=int(attention.sum()),
        num_loss_tokens=int(mask.sum()),
        truncated=cut,
    )
