"""Replay samples without pixels: a rollout's token side (collapsed ids, trained spans, log-probs) plus the
content addresses of its media, rebuilt into the bit-identical Example when replayed; the media store.

Why not the Example itself: its float32 pixel_values take 24 bytes per image pixel (3 channels x 2 temporal
copies x 4 bytes), ~38 MB for one 2000x784 image, and SSR checkpoints its whole buffer at every save. A
sample here keeps what the pixels are rebuilt from instead: every image (and video frame) the model saw, at
its final size, as uint8 RGB in a content-addressed store beside the checkpoints
(`workdir/replay_media/<sha256>.npy`, 3 bytes per pixel, written once per distinct image however many
samples and checkpoints refer to it, deleted by `collect_media` when no kept checkpoint and no live sample
does). Rebuilding runs `processing.batch.build_example`, the very function that made the rollout's
Example, on the stored ids and media; a CRC-32 of the original pixel_values is checked after the rebuild, so
a changed processor config or a damaged file fails loudly instead of training on other pixels. Storing what
the model saw, not how to recompute it (record id + crop boxes), keeps replay independent of the data set,
the video decoder and the tools' resampling staying identical.

Checkpoint size of a full buffer (`pack_samples`, written by the checkpointer as one uncompressed npz):
4 bytes per collapsed token (int32 id; each image's pad run is stored as ONE pad), 8 per trained token (the
sampler's and the old float32 log-probs, on trained tokens only), 8 per run of trained tokens (the loss mask
as int32 [start, end) pairs), 8 per run of equal sampling temperature (float32 value, int32 length), 64 + 16
per image (hex sha256; fps and frame count), and per sample 8 (advantage) + 4 (pixel CRC) + 6 x 8 (counts)
+ 4 per qid character. The 7B recipe's worst case (capacity = rollout batch 512 x 8 = 4096 samples, each
12,088 tokens long with all but the first trained at one temperature, one image, a 6-character qid):
12,088 x 4 + 12,087 x 8 + 8 + 8 + 80 + 60 + 24 = 145,228 bytes per sample, x 4096 = 0.595 GB
(tests/test_replay.py measures it). A typical sample (1,000 prompt + 2,000 response tokens) takes 28 KB,
0.11 GB for the buffer. The float32 pixels the JSON codec stored were ~38 MB for one 2000x784 image, ~150 GB
per save for the same buffer.
"""

import dataclasses
import hashlib
import os
import re
import time
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from PIL import Image

from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing.batch import Example, build_example
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig, to_rgb
from pixel_reasoner_jax.rollout.policy import Video

MEDIA_DIR = "replay_media"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_STALE_TMP_S = 3600.0  # a temporary media file older than this is a crashed write


# ---------------------------------------------------------------------------------------------------------
# The media store
# ---------------------------------------------------------------------------------------------------------


class MediaStore:
    """Content-addressed uint8 RGB images, one `<sha256>.npy` each, shared by every sample and checkpoint.

    Writes are atomic (temporary file, then rename), so processes sharing the folder may write the same
    image at once; the name is the sha256 of the image's size and pixels.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def put(self, image: Image.Image) -> str:
        """Stores `image` as the model saw it (RGB, `processing.vision.to_rgb`); returns its digest."""
        rgb = np.asarray(to_rgb(image), dtype=np.uint8)
        digest = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}:".encode() + rgb.tobytes()).hexdigest()
        path = self.root / f"{digest}.npy"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{digest}.{os.getpid()}.{time.time_ns()}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, rgb, allow_pickle=False)
            os.replace(tmp, path)  # a reader never sees half an image under its final name
        return digest

    def get(self, digest: str) -> Image.Image:
        """The RGB image stored as `digest`.

        Raises:
          ValueError: `digest` is not a lower-case hex sha256 (it names a file, so nothing else may pass).
          FileNotFoundError: the store lacks it (a checkpoint whose media were deleted or never copied).
        """
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ValueError(f"media digest must be 64 lower-case hex characters, got {digest!r}")
        path = self.root / f"{digest}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"replay media {digest} is missing from {self.root}")
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"replay media {path} must hold uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
        return Image.fromarray(arr, "RGB")

    def digests(self) -> set[str]:
        """Every stored digest."""
        if not self.root.is_dir():
            return set()
        return {p.stem for p in self.root.glob("*.npy") if _DIGEST.fullmatch(p.stem)}

    def collect(self, keep: Iterable[str]) -> int:
        """Deletes every stored image not in `keep` (and stale temporary files); returns how many images."""
        drop = self.digests() - set(keep)
        for digest in drop:
            (self.root / f"{digest}.npy").unlink(missing_ok=True)
        now = time.time()
        for tmp in self.root.glob(".*.tmp") if self.root.is_dir() else ():
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_S:
                    tmp.unlink(missing_ok=True)
            except FileNotFoundError:  # another process renamed it meanwhile
                pass
        return len(drop)


# ---------------------------------------------------------------------------------------------------------
# One sample
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReplaySample:
    """A rollout as the replay buffer keeps it: everything but the pixels, which `media` names.

    Attributes:
      qid: the record's id.
      input_ids: (n,) int32 collapsed ids (ONE pad per vision item, as the trajectory holds them).
      trained_spans: (k, 2) int32 [start, end) runs of collapsed positions where loss_mask is 1.
      logprobs: (m,) float32 the sampler's log-probs of the trained tokens, in order.
      old_logprobs: (o,) float32 the old policy's log-probs of the trained targets (`replay.trained_values`).
      media: per vision item, (frame digests, fps): one frame and fps None for an image.
      pixel_crc: zlib.crc32 of the original Example's pixel_values bytes.
      temperatures: (m,) float32 the sampling temperature of the trained tokens, in order (None: 1.0).
    """

    qid: str
    input_ids: np.ndarray
    trained_spans: np.ndarray
    logprobs: np.ndarray
    old_logprobs: np.ndarray
    media: tuple[tuple[tuple[str, ...], float | None], ...]
    pixel_crc: int
    temperatures: np.ndarray | None = None


def _runs(mask: np.ndarray) -> np.ndarray:
    """(k, 2) int32 [start, end) of the runs of True in a 1-D bool mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return edges.reshape(-1, 2).astype(np.int32)


def _collapse(ex: Example) -> np.ndarray:
    """(T,) bool: the positions kept when every pad run of `ex` shrinks back to its first pad (the inverse
    of `chat.expand_pads`, which never sees two pads in a row)."""
    spans = np.asarray(ex.vision_spans, np.int64).reshape(-1, 2)
    if len(spans) != len(ex.grid_thw):
        raise ValueError(f"sample {ex.qid!r}: {len(spans)} pad runs for {len(ex.grid_thw)} vision items")
    keep = np.ones(ex.length, bool)
    for start, end in spans:
        if np.any(ex.loss_mask[start:end]):
            raise ValueError(f"sample {ex.qid!r}: the vision pads at [{start}, {end}) are trained")
        keep[start + 1 : end] = False
    return keep


def encode_sample(
    ex: Example, old_logprobs: np.ndarray, media: Sequence[Image.Image | Video], store: MediaStore
) -> ReplaySample:
    """One replay sample: `ex`'s tokens and log-probs, its media written to `store`.

    Args:
      ex: the expanded rollout (`processing.batch.expand_trajectory`).
      old_logprobs: (n,) float32 log-probs of its trained targets under the policy that sampled it, in
        order (`replay.trained_values`); n may be below the count when a training cut shortened it.
      media: the trajectory's vision items at their final size, in pad order (`Trajectory.media`).
      store: where the media go.

    Raises:
      ValueError: sampler log-probs outside the loss mask, a mask other than 0/1 or on a pad, more old
        log-probs than trained targets, or media that do not match the Example's items.
    """
    trained = ex.loss_mask != 0
    if np.any(ex.logprobs[~trained]):
        raise ValueError(f"sample {ex.qid!r}: a rollout has sampler log-probs only on trained tokens")
    if not np.all((ex.loss_mask == 0) | (ex.loss_mask == 1)):
        raise ValueError(f"sample {ex.qid!r}: loss_mask must hold 0 and 1 only")
    old = np.asarray(old_logprobs)
    if old.dtype != np.float32 or old.ndim != 1 or old.size > int(trained[1:].sum()):
        raise ValueError(
            f"sample {ex.qid!r}: old_logprobs must be float32 (n,) with n <= {int(trained[1:].sum())} trained "
            f"targets, got {old.dtype} {old.shape}"
        )
    kinds = [isinstance(m, Video) for m in media]
    if kinds != [bool(v) for v in ex.is_video]:
        raise ValueError(f"sample {ex.qid!r}: media kinds (is video) {kinds} differ from the Example's items")
    keep = _collapse(ex)
    refs = tuple(
        (tuple(store.put(f) for f in m.frames), float(m.fps))
        if isinstance(m, Video)
        else ((store.put(m),), None)
        for m in media
    )
    return ReplaySample(
        qid=ex.qid,
        input_ids=np.ascontiguousarray(ex.input_ids[keep], np.int32),
        trained_spans=_runs(trained[keep]),
        logprobs=np.ascontiguousarray(ex.logprobs[trained], np.float32),
        old_logprobs=old.copy(),
        media=refs,
        pixel_crc=zlib.crc32(np.ascontiguousarray(ex.pixel_values)),
        temperatures=None if ex.temperatures is None else np.ascontiguousarray(ex.temperatures[trained]),
    )


def decode_sample(
    sample: ReplaySample, store: MediaStore, proc_cfg: ImageProcessorConfig, model_cfg: ModelConfig
) -> tuple[Example, np.ndarray]:
    """(Example, old log-probs) of a sample, bit-identical to the Example it was encoded from.

    Args:
      proc_cfg, model_cfg: the processor and model the rollout's Example was built with.

    Raises:
      ValueError: the rebuilt pixels differ from the original's (a changed processor config or store).
      FileNotFoundError: a media file is missing.
    """
    n = len(sample.input_ids)
    mask = np.zeros(n, np.int8)
    for start, end in sample.trained_spans:
        mask[start:end] = 1
    logprobs = np.zeros(n, np.float32)
    logprobs[mask != 0] = sample.logprobs
    items = [
        Video(frames=tuple(store.get(d) for d in frames), fps=fps)
        if fps is not None
        else store.get(frames[0])
        for frames, fps in sample.media
    ]
    ex = build_example(sample.input_ids, mask, logprobs, items, proc_cfg, model_cfg, sample.qid)
    if zlib.crc32(np.ascontiguousarray(ex.pixel_values)) != sample.pixel_crc:
        raise ValueError(
            f"replay sample {sample.qid!r}: the pixels rebuilt from {store.root} differ from the rollout's "
            "(has the processor config or a media file changed since it was stored?)"
        )
    if sample.temperatures is not None:  # like the sampler's log-probs: 1.0 off the trained tokens
        temperatures = np.ones(ex.length, np.float32)
        temperatures[ex.loss_mask != 0] = sample.temperatures
        ex = dataclasses.replace(ex, temperatures=temperatures)
    return ex, sample.old_logprobs.copy()


def media_refs(samples: Iterable[ReplaySample]) -> set[str]:
    """Every media digest the samples refer to."""
    return {d for s in samples for frames, _ in s.media for d in frames}


# ---------------------------------------------------------------------------------------------------------
# Many samples as flat arrays (the buffer's checkpoint file)
# ---------------------------------------------------------------------------------------------------------

FRAMES_KEY = "frames"  # the array of media digests, read alone by `collect_media`


def _flat(parts: list[np.ndarray], dtype, tail: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    counts = np.array([len(p) for p in parts], np.int64)
    flat = np.concatenate([np.asarray(p, dtype).reshape(-1, *tail) for p in parts]) if parts else None
    return (np.zeros((0, *tail), dtype) if flat is None else flat.astype(dtype)), counts


def _split(arrays: dict[str, np.ndarray], key: str, counts_key: str) -> list[np.ndarray]:
    flat, counts = arrays[key], arrays[counts_key]
    if counts.ndim != 1 or np.any(counts < 0) or int(counts.sum()) != len(flat):
        raise ValueError(
            f"replay arrays: {counts_key} must be counts >= 0 summing to len({key}) = {len(flat)}"
        )
    return np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []


def _temperature_runs(s: ReplaySample) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of the runs of equal temperature over a sample's trained tokens."""
    t = np.ones_like(s.logprobs) if s.temperatures is None else np.asarray(s.temperatures, np.float32)
    if not len(t):
        return t, np.zeros(0, np.int32)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(t)) + 1])
    return t[starts], np.diff(np.concatenate([starts, [len(t)]])).astype(np.int32)


def pack_samples(samples: Sequence[ReplaySample]) -> dict[str, np.ndarray]:
    """Named flat arrays of `samples` (ragged fields as one concatenation plus per-sample counts)."""
    for s in samples:
        if not isinstance(s, ReplaySample):
            raise TypeError(f"replay buffer samples must be ReplaySample, got {type(s).__name__}")
    out: dict[str, np.ndarray] = {
        "qids": np.array([s.qid for s in samples], dtype=str) if samples else np.zeros(0, "<U1"),
        "pixel_crc": np.array([s.pixel_crc for s in samples], np.uint32),
    }
    out["input_ids"], out["token_counts"] = _flat([s.input_ids for s in samples], np.int32)
    out["trained_spans"], out["span_counts"] = _flat([s.trained_spans for s in samples], np.int32, (2,))
    out["logprobs"], out["logprob_counts"] = _flat([s.logprobs for s in samples], np.float32)
    out["old_logprobs"], out["old_counts"] = _flat([s.old_logprobs for s in samples], np.float32)
    # Sampling temperatures are constant over a turn: run-length coded over the trained tokens (a value and
    # a length per run), 1.0 for a sample stored without them.
    runs = [_temperature_runs(s) for s in samples]
    out["temperature_values"], out["temperature_runs"] = _flat([v for v, _ in runs], np.float32)
    out["temperature_lengths"] = _flat([n for _, n in runs], np.int32)[0]
    items = [m for s in samples for m in s.media]
    out["item_counts"] = np.array([len(s.media) for s in samples], np.int64)
    out["item_fps"] = np.array([np.nan if fps is None else fps for _, fps in items], np.float64)
    out[FRAMES_KEY], out["frame_counts"] = _flat([np.array(f, "S64") for f, _ in items], "S64")
    return out


def unpack_samples(arrays: dict[str, np.ndarray]) -> list[ReplaySample]:
    """The samples of `pack_samples(...)` arrays, equal field for field.

    Raises:
      KeyError: an array is missing. ValueError: counts that do not add up (a damaged or foreign file).
    """
    n = len(arrays["qids"])
    for key in ("pixel_crc", "token_counts", "span_counts", "logprob_counts", "old_counts", "item_counts"):
        if arrays[key].shape != (n,):
            raise ValueError(f"replay arrays: {key} has shape {arrays[key].shape}, expected ({n},) like qids")
    frames = [tuple(d.decode("ascii") for d in f) for f in _split(arrays, FRAMES_KEY, "frame_counts")]
    if arrays["item_fps"].shape != (len(frames),):
        raise ValueError(
            f"replay arrays: item_fps has shape {arrays['item_fps'].shape}, expected ({len(frames)},)"
        )
    fps = [None if np.isnan(x) else float(x) for x in arrays["item_fps"]]
    items = list(zip(frames, fps))
    fields = zip(
        [str(q) for q in arrays["qids"]],
        _split(arrays, "input_ids", "token_counts"),
        _split(arrays, "trained_spans", "span_counts"),
        _split(arrays, "logprobs", "logprob_counts"),
        _split(arrays, "old_logprobs", "old_counts"),
        _split(
            {"items": np.arange(len(items)), "item_counts": arrays["item_counts"]}, "items", "item_counts"
        ),
        arrays["pixel_crc"],
    )
    temps = [None] * n  # stored before temperatures were kept: 1.0
    if "temperature_values" in arrays:
        values = _split(arrays, "temperature_values", "temperature_runs")
        lengths = _split(arrays, "temperature_lengths", "temperature_runs")
        temps = [np.repeat(v, n_) for v, n_ in zip(values, lengths)]
    return [
        ReplaySample(
            q,
            ids.copy(),
            sp.copy(),
            lp.copy(),
            old.copy(),
            tuple(items[i] for i in idx),
            int(crc),
            None if t is None else t.copy(),
        )  # fmt: skip
        for (q, ids, sp, lp, old, idx, crc), t in zip(fields, temps)
    ]


def collect_media(store: MediaStore, live: Iterable[str], checkpointer, prefix: str) -> None:
    """Deletes the stored media that neither the live buffer (`live` digests) nor any checkpoint still on
    disk refers to (its `prefix + FRAMES_KEY` array). Process 0 deletes; every process waits for it, so none
    writes a new image while the others decide what is garbage.
    """
    if jax.process_index() == 0:
        keep = set(live)
        try:
            for step in checkpointer.all_steps():
                got = checkpointer.arrays(step, keys=(prefix + FRAMES_KEY,))
                keep.update(d.decode("ascii") for d in got.get(prefix + FRAMES_KEY, ()))
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            # Orbax deletes rotated steps in the background: what cannot be read now is collected next time.
            logging.warning("replay media: collection skipped, a checkpoint could not be read: %s", e)
        else:
            store.collect(keep)
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes("pixel_reasoner_replay_media_gc")
