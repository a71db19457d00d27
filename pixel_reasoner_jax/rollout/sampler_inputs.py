"""Host-side packing of the JAX sampler's requests: validation, pad expansion, pixels, M-RoPE, buckets.

`expand_request` checks and expands one GenerationRequest; `pack_batch` pads a chunk of them into the NumPy
arrays of one prefill + decode call (rollout/sampler.py). Nothing here touches a device.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.models.vision import VisionInputs
from pixel_reasoner_jax.processing.batch import build_example, pack_vision, pick_bucket
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.policy import GenerationRequest, Video

__all__ = ["ExpandedRequest", "SamplerBatch", "expand_request", "pack_batch", "request_label", "split_seed"]

# Left padding id; any id other than a vision pad works, since padding is masked out everywhere.
PAD_ID = 0
# Stop-id slots per row (a decode compile dimension): the episode sends 3 ids, servers add the eos ids.
MIN_STOP_SLOTS = 8


def request_label(index: int, req: GenerationRequest) -> str:
    return f"request {index}" + (f" (rid {req.rid!r})" if req.rid else "")


@dataclasses.dataclass(frozen=True)
class ExpandedRequest:
    """One request with each pad expanded to its item's merged-token count.

    Attributes:
      input_ids: (T,) int32 expanded ids.
      positions: (3, T) int32 M-RoPE positions.
      pixel_values: (P, C) float32 patch rows of its items, in pad order.
      grid_thw: (I, 3) int64 grids of its items, in pad order.
    """

    input_ids: np.ndarray
    positions: np.ndarray
    pixel_values: np.ndarray
    grid_thw: np.ndarray

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def next_pos(self) -> int:
        """Position of the first generated token (all three axes): the prompt's max position + 1."""
        return int(self.positions.max()) + 1 if self.length else 0


def expand_request(
    req: GenerationRequest, index: int, cfg: ModelConfig, image_cfg: ImageProcessorConfig
) -> ExpandedRequest:
    """Validates and expands one request (media already at their final size, never resized here).

    Raises:
      ValueError: naming the request, for empty ids, pads that do not match the media in count or kind
        (image pad for a PIL image, video pad for a `Video`), or a media item whose sides are not
        multiples of patch * merge (28).
    """
    label = request_label(index, req)
    ids = np.asarray(req.input_ids, np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError(f"{label}: input_ids is empty; a prompt needs at least one token")
    img, vid = cfg.image_token_id, cfg.video_token_id
    pad_kinds = [int(t) for t in ids if t in (img, vid)]
    kinds = []
    for k, m in enumerate(req.media):
        if isinstance(m, Video):
            kinds.append(vid)
        elif isinstance(m, Image.Image):
            kinds.append(img)
        else:
            raise ValueError(
                f"{label}: media item {k} is a {type(m).__name__}; expected a PIL image or a Video"
            )
    if len(pad_kinds) != len(kinds):
        raise ValueError(
            f"{label}: input_ids hold {len(pad_kinds)} image/video pads but {len(kinds)} media items were "
            "given; each item needs exactly one pad"
        )
    if pad_kinds != kinds:
        name = {img: "image", vid: "video"}
        raise ValueError(
            f"{label}: pad kinds {[name[t] for t in pad_kinds]} do not match the media kinds "
            f"{[name[t] for t in kinds]} in order"
        )
    # The trainer's expansion (processing/batch.py), so sampler and trainer see identical ids, positions
    # and pixels for the same request.
    try:
        ex = build_example(
            ids,
            np.zeros(ids.shape, np.int8),
            np.zeros(ids.shape, np.float32),
            req.media,
            image_cfg,
            cfg,
            label,
        )
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from e
    return ExpandedRequest(ex.input_ids, ex.positions, ex.pixel_values, ex.grid_thw)


def split_seed(seed: int) -> tuple[int, int]:
    """A Python int seed as two uint32 words (low, high) of its value mod 2**64."""
    s = int(seed) % (1 << 64)
    return s & 0xFFFFFFFF, s >> 32


@dataclasses.dataclass(frozen=True)
class SamplerBatch:
    """NumPy arrays of one prefill + decode call; B rows (padded with dead rows), prompts left-padded to T.

    Attributes:
      input_ids, attention_mask: (B, T) int32.
      positions: (3, B, T) int32 M-RoPE positions (1 on padding).
      pixel_values: (B, Pb, C) float32 each row's item rows in pad order, zero-padded to the per-sample
        patch bucket; None without media. vision_inputs: their stacked prepare_vision, likewise
        (processing.batch.pack_vision).
      next_pos: (B,) int32 position of each row's first new token.
      temperature, top_p: (B,) float32; top_k: (B,) int32 (-1 off); max_new: (B,) int32.
      stop_ids: (B, S) int32 stop ids per row, padded with -1.
      seeds: (B, 2) uint32 per-row seed words.
      live: (B,) bool, False on padding rows (finished before they start).
      num_new: decode length N, max_new rounded up to the decode bucket.
      prompt_tokens: expanded prompt length of each live row.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    pixel_values: np.ndarray | None
    vision_inputs: VisionInputs | None
    next_pos: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    max_new: np.ndarray
    stop_ids: np.ndarray
    seeds: np.ndarray
    live: np.ndarray
    num_new: int
    prompt_tokens: tuple[int, ...]


def pack_batch(
    expanded: Sequence[ExpandedRequest],
    requests: Sequence[GenerationRequest],
    seeds: Sequence[int],
    cfg: ModelConfig,
    *,
    batch_size: int,
    seq_buckets: Sequence[int] | None,
    patch_buckets: Sequence[int] | None,
    decode_bucket: int,
    first_index: int = 0,
) -> SamplerBatch:
    """Pads `expanded` (with their `requests` and `seeds`) into one SamplerBatch of `batch_size` rows.

    Raises:
      ValueError: a prompt longer than the largest sequence bucket, or a request with more patch rows than
        the largest patch bucket (naming it; `first_index` is the chunk's offset in the caller's list).
    """
    n = len(expanded)
    if not 0 < n <= batch_size:
        raise ValueError(f"pack_batch: {n} requests for a batch of {batch_size} rows")
    lengths = [e.length for e in expanded]
    t = pick_bucket(max(lengths), seq_buckets)
    if t is None:
        i = int(np.argmax(lengths))
        raise ValueError(
            f"{request_label(first_index + i, requests[i])}: expanded prompt of {lengths[i]} tokens is "
            f"longer than the largest sequence bucket {max(seq_buckets)}"
        )
    ids = np.full((batch_size, t), PAD_ID, np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    positions = np.ones((3, batch_size, t), np.int32)
    for r, e in enumerate(expanded):
        ids[r, t - e.length :] = e.input_ids
        mask[r, t - e.length :] = 1
        positions[:, r, t - e.length :] = e.positions
    # The attention-window count is a compile dimension too; a floor of twice the full windows a per-sample
    # bucket holds covers typical batches, so it varies only for samples of many small items.
    pb = pick_bucket(max(e.pixel_values.shape[0] for e in expanded), patch_buckets)
    slots = (cfg.vision.window_size // cfg.vision.patch_size) ** 2
    pad = batch_size - n
    pixel_values, vision_inputs = pack_vision(
        [e.pixel_values for e in expanded] + [np.zeros((0, cfg.vision.patch_dim), np.float32)] * pad,
        [e.grid_thw for e in expanded] + [np.zeros((0, 3), np.int64)] * pad,
        cfg.vision,
        patch_buckets=patch_buckets,
        min_windows=pick_bucket(max(1, 2 * (pb or 0) // slots), None),
        labels=[request_label(first_index + i, r) for i, r in enumerate(requests)] + ["padding"] * pad,
    )
    sp = [r.sampling for r in requests]
    max_new = np.array([s.max_new_tokens for s in sp] + [1] * pad, np.int32)
    num_new = -(-int(max_new.max()) // decode_bucket) * decode_bucket
    n_stop = pick_bucket(max([len(s.stop_token_ids) for s in sp] + [MIN_STOP_SLOTS]), None)
    stop_ids = np.full((batch_size, n_stop), -1, np.int32)
    for r, s in enumerate(sp):
        stop_ids[r, : len(s.stop_token_ids)] = s.stop_token_ids
    return SamplerBatch(
        input_ids=ids,
        attention_mask=mask,
        positions=positions,
        pixel_values=pixel_values,
        vision_inputs=vision_inputs,
        next_pos=np.array([e.next_pos for e in expanded] + [0] * pad, np.int32),
        temperature=np.array([s.temperature for s in sp] + [0.0] * pad, np.float32),
        top_p=np.array([s.top_p for s in sp] + [1.0] * pad, np.float32),
        top_k=np.array([s.top_k for s in sp] + [-1] * pad, np.int32),
        max_new=max_new,
        stop_ids=stop_ids,
        seeds=np.array([split_seed(s) for s in seeds] + [(0, 0)] * pad, np.uint32).reshape(batch_size, 2),
        live=np.arange(batch_size) < n,
        num_new=num_new,
        prompt_tokens=tuple(lengths),
    )
