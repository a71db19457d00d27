"""Trainer view of sequences: expanded ids, masks, pixels, M-RoPE positions, padded batches.

`build_example` (collapsed ids + media) and `encode_messages` (a conversation) make one `Example`
(rollout/trajectory.expand_trajectory and data/sft_examples.sft_example call them); `collate` pads
examples to sequence and per-sample patch buckets and adds the shifted targets and the vision-tower
index arrays.

Alignment convention of a `Batch` (the "prediction" alignment): the model's output at position t predicts
`targets[:, t] = input_ids[:, t + 1]`, and `loss_mask[:, t]`, `sampler_logprobs[:, t]` and `old_logprobs[:, t]`
all describe that target token t + 1. So `models.qwen25vl.token_logprobs(model, hidden, batch.targets)` lines
up with every mask and log-prob array without further shifting. An `Example` is in TOKEN alignment instead:
its loss_mask[t] and logprobs[t] describe input_ids[t] itself.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from pixel_reasoner_jax.models.config import ModelConfig, VisionConfig
from pixel_reasoner_jax.models.vision import (
    VisionInputs,
    prepare_vision,
    slot_length,
    stack_vision,
)
from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.processing.rope import get_rope_index
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import (
    ImageProcessorConfig,
    Video,
    preprocess_image,
    preprocess_video,
)


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
      pixel_values: (B, Pb, C) float32, each row's vision items' patch rows in pad order, zero-padded to
        the per-sample patch bucket Pb (`pack_vision`); None for a batch without vision items.
      vision_inputs: the rows' stacked models.vision.prepare_vision outputs at Pb; None likewise.
      grid_thw: (N, 3) int64 every item's grid in flat (row-major B, T) pad order.
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


# ------------------------------------------------------------------------------------------ conversations


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


def pack_vision(
    pixels: Sequence[np.ndarray],
    grids: Sequence[np.ndarray],
    vision_cfg: VisionConfig,
    *,
    patch_buckets: Sequence[int] | None,
    min_windows: int = 1,
    one_slot: bool = False,
    slot_len: int | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[np.ndarray | None, VisionInputs | None]:
    """The per-sample vision layout of B batch rows: (B, Pb, C) patch rows and their stacked index arrays.

    Pb is the smallest patch bucket holding the largest sample, so each sample's images are encoded on the
    device(s) holding its tokens and attention never crosses samples. Rows without vision items get
    padding only.

    Args:
      pixels: per row, (P_b, C) patch rows of its items in pad order (P_b may be 0).
      grids: per row, (I_b, 3) grids of those items.
      vision_cfg: the vision tower config, for prepare_vision.
      patch_buckets: allowed per-sample patch counts (None = powers of two), multiples of merge^2.
      min_windows: at least this many attention windows per sample (a compile dimension; the count is
        otherwise the largest sample's power-of-two need).
      one_slot: full attention over one slot of the whole bucket (no compile dimension beyond Pb, at Pb^2
        cost per sample: the sampler's prompts); otherwise the batch's images are packed into slots as
        long as its largest image or frame slice (`vision.slot_bucket`), as many as the fullest sample
        needs (bucketed), at about the sum of the squared image sizes.
      slot_len: the slot length when packing (None = `vision.slot_length` of these rows; micro-batches
        that stack pass their common one).
      labels: per row, a name for errors (default "sample i").

    Returns:
      (pixel_values, vision_inputs), or (None, None) when no row has vision items.

    Raises:
      ValueError: a row with more patch rows than the largest patch bucket (naming it).
    """
    counts = [int(p.shape[0]) for p in pixels]
    if not any(counts):
        return None, None
    pb = pick_bucket(max(counts), patch_buckets)
    if pb is None:
        i = int(np.argmax(counts))
        name = f"sample {i}" if labels is None else labels[i]
        raise ValueError(
            f"{name} has {counts[i]} patch rows, more than the largest patch bucket {max(patch_buckets)} "
            f"(per sample: {counts})"
        )
    width = next(p.shape[1] for p in pixels if p.shape[0])
    pixel_values = np.zeros((len(pixels), pb, width), np.float32)
    for i, p in enumerate(pixels):
        pixel_values[i, : p.shape[0]] = p
    if one_slot:
        slot_len, num_slots = pb, 1
    else:
        slot_len, num_slots = slot_len or slot_length(grids, pb), None
    vis = [
        prepare_vision(g, vision_cfg, patch_bucket=pb, slot_len=slot_len, num_slots=num_slots) for g in grids
    ]
    need = max(v.window_gather.shape[0] for v in vis)
    # Each sample's slot count is already a `slot_bucket` step: stack_vision pads to the largest.
    return pixel_values, stack_vision(vis, max(need, min_windows))


def pixels_in(x, dtype):
    """Pixel values `x` (host array, jax.Array or ShapeDtypeStruct) in `dtype`; None stays None.

    The model's compute dtype loses nothing: the vision tower's first matmul casts its input to it, so a
    bfloat16 model reads the same values from float32 and bfloat16 pixels, and the array (the largest of a
    vision batch) and its host-to-device copy halve.
    """
    if x is None or dtype is None or x.dtype == np.dtype(dtype):
        return x
    dtype = np.dtype(dtype)
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(dtype)


def collate(
    examples: Sequence[Example],
    *,
    pad_id: int,
    vision_cfg: VisionConfig,
    seq_buckets: Sequence[int] | None = None,
    patch_buckets: Sequence[int] | None = None,
    min_windows: int = 1,
    slot_len: int | None = None,
    truncate: bool = False,
) -> Batch:
    """Pads examples into one Batch; T and the patch rows go to the smallest bucket that fits.

    Args:
      examples: at least one Example.
      pad_id: id of padding tokens (input_ids and the last target column).
      vision_cfg: the vision tower config, for prepare_vision.
      seq_buckets, patch_buckets: allowed sizes (patch rows per sample); None = powers of two. Patch
        buckets must be multiples of spatial_merge_size**2.
      min_windows: at least this many attention windows per sample (`pack_vision`).
      slot_len: full-attention slot length (`pack_vision`; None = the batch's own).
      truncate: a sequence longer than the largest seq bucket is cut (truncate_example) instead of raising.

    Raises:
      ValueError: no examples; a sequence longer than the largest bucket (naming the sample) without
        truncate; a sample with more patch rows than the largest patch bucket.
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
    pixel_values, vision_inputs = pack_vision(
        [ex.pixel_values for ex in exs],
        [ex.grid_thw for ex in exs],
        vision_cfg,
        patch_buckets=patch_buckets,
        min_windows=min_windows,
        slot_len=slot_len,
        labels=[f"sample {i} ({ex.qid!r})" for i, ex in enumerate(exs)],
    )
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
