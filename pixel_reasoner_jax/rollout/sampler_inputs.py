"""Host-side packing of the JAX sampler's requests: validation, pad expansion, pixels, M-RoPE, buckets.

`expand_request` checks and expands one GenerationRequest; `prompt_groups` finds identical prompts (prefilled
once); `pack_prompts` pads prompts into one prefill call's arrays and `SlotParams` holds the decode slots'
sampling parameters (rollout/sampler.py). Nothing here touches a device.
"""

import dataclasses
import hashlib
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.models.vision import VisionInputs
from pixel_reasoner_jax.processing.batch import build_example, pack_vision, pick_bucket
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.policy import GenerationRequest, Video

__all__ = [
    "ExpandedRequest",
    "PromptBatch",
    "SlotParams",
    "check_fits",
    "expand_request",
    "prompt_min_windows",
    "pack_prompts",
    "prompt_groups",
    "request_label",
    "split_seed",
    "stop_slots",
]

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


def prompt_groups(requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """Indices of `requests` grouped by identical prompts (same ids, same media content), in first-seen
    order: each group is prefilled once and its KV rows copied to every member (GRPO's G samples).

    Media compare by content (mode, size, pixel bytes; a video's fps too), since the G episodes of a record
    may hold separately resized copies of one image; each object is hashed once per call.
    """
    digests: dict[int, bytes] = {}

    def image_digest(im: Image.Image) -> bytes:
        if id(im) not in digests:
            h = hashlib.blake2b(f"{im.mode}{im.size}".encode(), digest_size=16)
            h.update(im.tobytes())
            digests[id(im)] = h.digest()
        return digests[id(im)]

    def media_key(m) -> tuple:
        if isinstance(m, Video):
            return ("video", m.fps, tuple(image_digest(f) for f in m.frames))
        return ("image", image_digest(m)) if isinstance(m, Image.Image) else ("other", id(m))

    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        key = (tuple(int(t) for t in r.input_ids), tuple(media_key(m) for m in r.media))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def split_seed(seed: int) -> tuple[int, int]:
    """A Python int seed as two uint32 words (low, high) of its value mod 2**64."""
    s = int(seed) % (1 << 64)
    return s & 0xFFFFFFFF, s >> 32


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """NumPy arrays of one prefill call; B rows (padded with empty rows), prompts left-padded to T.

    Attributes:
      input_ids, attention_mask: (B, T) int32.
      positions: (3, B, T) int32 M-RoPE positions (1 on padding).
      pixel_values: (B, Pb, C) float32 each row's item rows in pad order, zero-padded to the per-sample
        patch bucket; None without media. vision_inputs: their stacked prepare_vision, likewise
        (processing.batch.pack_vision).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    pixel_values: np.ndarray | None
    vision_inputs: VisionInputs | None


def check_fits(
    expanded: ExpandedRequest,
    label: str,
    seq_buckets: Sequence[int] | None,
    patch_buckets: Sequence[int] | None,
) -> int:
    """The sequence bucket of one expanded prompt.

    Raises:
      ValueError: naming the request, for a prompt longer than the largest sequence bucket or more patch
        rows than the largest patch bucket.
    """
    t = pick_bucket(expanded.length, seq_buckets)
    if t is None:
        raise ValueError(
            f"{label}: expanded prompt of {expanded.length} tokens is longer than the largest sequence "
            f"bucket {max(seq_buckets)}"
        )
    n = expanded.pixel_values.shape[0]
    if n and pick_bucket(n, patch_buckets) is None:
        raise ValueError(f"{label}: {n} patch rows, more than the largest patch bucket {max(patch_buckets)}")
    return t


def prompt_min_windows(vision_cfg, patch_bucket: int) -> int:
    """The attention-window floor of a prompt batch at per-sample `patch_bucket`: the window count is a
    compile dimension too; a floor of twice the full windows the bucket holds covers typical batches, so it
    varies only for samples of many small items."""
    slots = (vision_cfg.window_size // vision_cfg.patch_size) ** 2
    return pick_bucket(max(1, 2 * patch_bucket // slots), None)


def pack_prompts(
    expanded: Sequence[ExpandedRequest],
    cfg: ModelConfig,
    *,
    batch_size: int,
    seq_buckets: Sequence[int] | None,
    patch_buckets: Sequence[int] | None,
) -> PromptBatch:
    """Pads `expanded` into one PromptBatch of `batch_size` rows (each must pass `check_fits`).

    Raises:
      ValueError: a row with more patch rows than the largest patch bucket (callers check first).
    """
    n = len(expanded)
    if not 0 < n <= batch_size:
        raise ValueError(f"pack_prompts: {n} prompts for a batch of {batch_size} rows")
    t = pick_bucket(max(e.length for e in expanded), seq_buckets)
    ids = np.full((batch_size, t), PAD_ID, np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    positions = np.ones((3, batch_size, t), np.int32)
    for r, e in enumerate(expanded):
        ids[r, t - e.length :] = e.input_ids
        mask[r, t - e.length :] = 1
        positions[:, r, t - e.length :] = e.positions
    pb = pick_bucket(max(e.pixel_values.shape[0] for e in expanded), patch_buckets)
    pad = batch_size - n
    pixel_values, vision_inputs = pack_vision(
        [e.pixel_values for e in expanded] + [np.zeros((0, cfg.vision.patch_dim), np.float32)] * pad,
        [e.grid_thw for e in expanded] + [np.zeros((0, 3), np.int64)] * pad,
        cfg.vision,
        patch_buckets=patch_buckets,
        min_windows=prompt_min_windows(cfg.vision, pb or 0),
        one_slot=True,
    )
    return PromptBatch(ids, mask, positions, pixel_values, vision_inputs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotParams:
    """Per-slot (B,) arrays of the decode slots' requests, read by the prefill and decode programs.

    Attributes:
      base: int32 cache slot of each row's first generated token (its prompt's sequence bucket).
      next_pos: int32 position of the first generated token (all three M-RoPE axes).
      temperature, top_p: float32; top_k: int32 (-1 off); max_new: int32.
      stop_ids: (B, S) int32 stop ids per row, padded with -1.
      seeds: (B, 2) uint32 per-row seed words.
    Empty slots hold greedy one-token defaults; their rows are never read.
    """

    base: np.ndarray
    next_pos: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    max_new: np.ndarray
    stop_ids: np.ndarray
    seeds: np.ndarray

    @classmethod
    def empty(cls, slots: int, stop_slots: int) -> "SlotParams":
        z = np.zeros(slots, np.int32)
        return cls(
            base=z.copy(),
            next_pos=z.copy(),
            temperature=np.zeros(slots, np.float32),
            top_p=np.ones(slots, np.float32),
            top_k=np.full(slots, -1, np.int32),
            max_new=np.ones(slots, np.int32),
            stop_ids=np.full((slots, stop_slots), -1, np.int32),
            seeds=np.zeros((slots, 2), np.uint32),
        )

    def assign(self, slot: int, req: GenerationRequest, seed: int, next_pos: int, base: int) -> None:
        """Writes request `req` (with its resolved `seed`) into `slot` (the arrays are updated in place)."""
        sp = req.sampling
        self.base[slot], self.next_pos[slot] = base, next_pos
        self.temperature[slot], self.top_p[slot], self.top_k[slot] = sp.temperature, sp.top_p, sp.top_k
        self.max_new[slot] = sp.max_new_tokens
        self.stop_ids[slot] = -1
        self.stop_ids[slot, : len(sp.stop_token_ids)] = sp.stop_token_ids
        self.seeds[slot] = split_seed(seed)


def stop_slots(requests: Sequence[GenerationRequest]) -> int:
    """Stop-id slots per row for these requests (a decode compile dimension)."""
    return pick_bucket(max([len(r.sampling.stop_token_ids) for r in requests] + [MIN_STOP_SLOTS]), None)
