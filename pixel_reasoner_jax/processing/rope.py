"""3-D multimodal rotary (M-RoPE) position ids on the host (NumPy), whole-batch and turn-by-turn.

Semantics of transformers 4.x / Qwen's own code (the ones the model was trained with, reference/qwen25vl.md
§4.1): text after an image or video resumes at the block's max position + 1, padding positions are 1, and
the video time index is floor(t * second_per_grid_t * tokens_per_second) computed in float32.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["RopeState", "decode_positions", "extend_positions", "get_rope_index", "init_rope_state"]


def _grid_list(grids, what: str) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    arr = np.asarray(grids, dtype=np.int64).reshape(-1, 3) if len(grids) else np.zeros((0, 3), np.int64)
    if (arr <= 0).any():
        raise ValueError(f"{what} must hold positive (t, h, w) triples, got {arr.tolist()}")
    return [tuple(int(x) for x in row) for row in arr]


def _vision_block(
    start: int,
    grid: tuple[int, int, int],
    merge: int,
    time_step: tuple[float, float] | None,
) -> np.ndarray:
    """(3, t*h*w/merge^2) positions of one image (time_step None) or video block starting at `start`.

    time_step: (second_per_grid_t, tokens_per_second) of a video.
    """
    gt, gh, gw = grid
    if gh % merge or gw % merge:
        raise ValueError(f"grid {grid}: h and w must be multiples of spatial_merge_size {merge}")
    lh, lw = gh // merge, gw // merge
    if time_step is None:
        t_idx = np.arange(gt, dtype=np.int64)
    else:
        # (t * seconds) * tokens_per_second in float32, then truncated: the reference's exact arithmetic,
        # which decides the floor at values such as 3 * (2/3) * 2.
        sec, tps = np.float32(time_step[0]), np.float32(time_step[1])
        t_idx = ((np.arange(gt, dtype=np.float32) * sec) * tps).astype(np.int64)
    t = np.broadcast_to(t_idx[:, None, None], (gt, lh, lw))
    h = np.broadcast_to(np.arange(lh)[None, :, None], (gt, lh, lw))
    w = np.broadcast_to(np.arange(lw)[None, None, :], (gt, lh, lw))
    return np.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)]) + start


@dataclasses.dataclass(frozen=True)
class RopeState:
    """What extending a sequence needs to know about its prefix.

    Attributes:
      next_pos: first position of a following text token (max position so far + 1).
      num_tokens: unpadded tokens so far.
      num_images, num_videos: vision items consumed so far (for error messages and checks).
    """

    next_pos: int = 0
    num_tokens: int = 0
    num_images: int = 0
    num_videos: int = 0

    @property
    def rope_delta(self) -> int:
        """Offset of decode positions: a token at absolute index p gets t = h = w = p + rope_delta."""
        return self.next_pos - self.num_tokens


def init_rope_state() -> RopeState:
    return RopeState()


def extend_positions(
    state: RopeState,
    new_ids: Sequence[int] | np.ndarray,
    new_image_grids=None,
    new_video_grids=None,
    second_per_grid_ts=None,
    *,
    spatial_merge_size: int,
    tokens_per_second: float,
    image_token_id: int,
    video_token_id: int,
) -> tuple[np.ndarray, RopeState]:
    """Positions of tokens appended to a sequence whose prefix is summarised by `state`.

    Every image (video) pad run in `new_ids` consumes the next grid of `new_image_grids`
    (`new_video_grids`) and exactly t*h*w/merge^2 pad tokens; a run must lie entirely in one call.
    Extending turn by turn equals one call on the concatenation; prefix positions are never recomputed.

    Args:
      state: summary of the prefix (`init_rope_state()` for an empty one).
      new_ids: (n,) unpadded token ids.
      new_image_grids: (I, 3) grids of the images in `new_ids`, in order.
      new_video_grids: (J, 3) grids of the videos in `new_ids`, in order.
      second_per_grid_ts: (J,) seconds per temporal grid step of each video (1.0 when None).

    Returns:
      positions (3, n) int32 and the new state.

    Raises:
      ValueError: grid counts or pad counts that do not match the ids.
    """
    ids = np.asarray(new_ids, dtype=np.int64).reshape(-1)
    images = _grid_list(new_image_grids, "new_image_grids")
    videos = _grid_list(new_video_grids, "new_video_grids")
    if second_per_grid_ts is None:
        secs = [1.0] * len(videos)
    else:
        secs = [float(s) for s in np.asarray(second_per_grid_ts, dtype=np.float64).reshape(-1)]
        if len(secs) != len(videos):
            raise ValueError(f"second_per_grid_ts has {len(secs)} entries for {len(videos)} videos")
    merge2 = spatial_merge_size**2
    out = np.empty((3, ids.size), np.int64)
    cur, i, img_k, vid_k = state.next_pos, 0, 0, 0
    while i < ids.size:
        tok = ids[i]
        if tok == image_token_id or tok == video_token_id:
            is_img = tok == image_token_id
            grids, k = (images, img_k) if is_img else (videos, vid_k)
            kind = "image" if is_img else "video"
            if k >= len(grids):
                raise ValueError(
                    f"input ids hold more {kind} pad runs than the {len(grids)} {kind} grids given "
                    f"(at token {state.num_tokens + i})"
                )
            grid = grids[k]
            n = grid[0] * grid[1] * grid[2] // merge2
            run = ids[i : i + n]
            if run.size != n or (run != tok).any():
                raise ValueError(
                    f"{kind} {k} with grid {grid} needs {n} consecutive pad tokens at index "
                    f"{state.num_tokens + i}, found {int(np.argmax(np.append(run != tok, True)))}"
                )
            step = None if is_img else (secs[k], tokens_per_second)
            block = _vision_block(cur, grid, spatial_merge_size, step)
            out[:, i : i + n] = block
            cur = int(block.max()) + 1
            i += n
            if is_img:
                img_k += 1
            else:
                vid_k += 1
        else:
            j = i
            while j < ids.size and ids[j] != image_token_id and ids[j] != video_token_id:
                j += 1
            out[:, i:j] = np.arange(cur, cur + j - i)[None]
            cur += j - i
            i = j
    if img_k != len(images) or vid_k != len(videos):
        raise ValueError(
            f"input ids hold {img_k} image and {vid_k} video pad runs, but {len(images)} image and "
            f"{len(videos)} video grids were given"
        )
    new_state = RopeState(
        next_pos=cur,
        num_tokens=state.num_tokens + ids.size,
        num_images=state.num_images + img_k,
        num_videos=state.num_videos + vid_k,
    )
    return out.astype(np.int32), new_state


def get_rope_index(
    input_ids,
    attention_mask=None,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    *,
    spatial_merge_size: int,
    tokens_per_second: float,
    image_token_id: int,
    video_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions of a (padded) batch.

    Args:
      input_ids: (T,) or (B, T) ints.
      attention_mask: same shape, 1 for real tokens (any padding side); None = all real.
      image_grid_thw: (I, 3) grids of all images in the batch in flat (row-major) order.
      video_grid_thw: (J, 3) grids of all videos, same order convention.
      second_per_grid_ts: (J,) seconds per temporal grid step of each video (1.0 when None).

    Returns:
      positions (3, B, T) int32 (padding positions 1) and rope_deltas (B,) int32 = max + 1 - unpadded length.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (T,) or (B, T), got shape {np.shape(input_ids)}")
    if attention_mask is None:
        mask = np.ones(ids.shape, bool)
    else:
        mask = np.asarray(attention_mask).reshape(ids.shape).astype(bool)
    images = _grid_list(image_grid_thw, "image_grid_thw")
    videos = _grid_list(video_grid_thw, "video_grid_thw")
    secs = None if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float64).reshape(-1)
    if secs is not None and secs.size != len(videos):
        raise ValueError(f"second_per_grid_ts has {secs.size} entries for {len(videos)} videos")
    b, t = ids.shape
    positions = np.ones((3, b, t), np.int32)
    deltas = np.zeros((b,), np.int32)
    img_k = vid_k = 0
    for row in range(b):
        row_ids = ids[row][mask[row]]
        n_img = _count_runs(row_ids, image_token_id, images[img_k:], spatial_merge_size)
        n_vid = _count_runs(row_ids, video_token_id, videos[vid_k:], spatial_merge_size)
        pos, state = extend_positions(
            RopeState(),
            row_ids,
            images[img_k : img_k + n_img],
            videos[vid_k : vid_k + n_vid],
            None if secs is None else secs[vid_k : vid_k + n_vid],
            spatial_merge_size=spatial_merge_size,
            tokens_per_second=tokens_per_second,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
        )
        positions[:, row, mask[row]] = pos
        deltas[row] = state.rope_delta
        img_k, vid_k = img_k + n_img, vid_k + n_vid
    if img_k != len(images) or vid_k != len(videos):
        raise ValueError(
            f"the batch holds {img_k} images and {vid_k} videos, but {len(images)} image and "
            f"{len(videos)} video grids were given"
        )
    return positions, deltas


def _count_runs(ids: np.ndarray, token: int, grids: list, merge: int) -> int:
    """How many of `grids` (taken in order) the pad tokens `token` in `ids` consume."""
    total = int((ids == token).sum())
    k = 0
    while total > 0:
        if k >= len(grids):
            raise ValueError(f"{total} pad tokens of id {token} left over with no grid to match them")
        total -= grids[k][0] * grids[k][1] * grids[k][2] // merge**2
        k += 1
    if total < 0:
        raise ValueError(f"pad tokens of id {token} do not fill the grids matched to them")
    return k


def decode_positions(rope_deltas, cache_positions) -> np.ndarray:
    """(3, B, n) positions of decoded tokens at absolute cache indices `cache_positions` (B, n) or (n,)."""
    p = np.asarray(cache_positions, np.int64)
    d = np.asarray(rope_deltas, np.int64).reshape(-1)
    if p.ndim == 1:
        p = np.broadcast_to(p[None], (d.size, p.size))
    out = p + d[:, None]
    return np.broadcast_to(out[None], (3, *out.shape)).astype(np.int32)
