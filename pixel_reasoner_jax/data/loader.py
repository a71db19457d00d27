"""grain pipelines over parsed records: seeded shuffle, epochs, per-process shards, lazy media decoding,
and iterators whose get_state()/set_state() resume the exact order.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
from PIL import Image

from pixel_reasoner_jax.data.records import RLRecord, SFTRecord, load_image, load_video_frames


@dataclasses.dataclass(frozen=True)
class LoadRLMedia:
    """Decodes an RLRecord's media: {"record", "images": [PIL] (image query), "video": [PIL] | None}.

    A top-level callable (not a lambda) so multiprocessing workers can pickle it.
    """

    num_frames: int = 16

    def __call__(self, record: RLRecord) -> dict[str, Any]:
        if not record.is_video:
            return {"record": record, "images": [load_image(p) for p in record.images], "video": None}
        # One path is a video file or a frame directory; several paths are the frames themselves.
        source = record.images[0] if len(record.images) == 1 else record.images
        return {"record": record, "images": [], "video": load_video_frames(source, self.num_frames)}


@dataclasses.dataclass(frozen=True)
class LoadSFTMedia:
    """Decodes an SFTRecord's media: {"record", "media": {path: PIL}}; a path used twice loads once."""

    def __call__(self, record: SFTRecord) -> dict[str, Any]:
        media: dict[str, Image.Image] = {}
        for path in record.images:
            if path not in media:
                media[path] = load_image(path)
        return {"record": record, "media": media}


def _pipeline(
    records: Sequence[Any],
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int | None,
    process_count: int | None,
    load_fn,
) -> grain.MapDataset:
    if not records:
        raise ValueError("records is empty; expected at least one record")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    if process_index is None or process_count is None:
        import jax  # only for the defaults: callers that pass both need no jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
    ds = grain.MapDataset.source(list(records)).seed(seed)
    if shuffle:
        ds = ds.shuffle()  # reshuffled each epoch by repeat(), deterministically from the seed
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        # Equal shard lengths: every process must run the same number of steps (collectives would hang).
        ds = ds[: len(ds) // process_count * process_count]
    # Sharding the global (shuffled, repeated) stream: position i goes to process i % count, so shards
    # are disjoint and together cover each epoch.
    ds = ds[process_index::process_count]
    return ds.map(load_fn) if load_fn is not None else ds


def rl_dataset(
    records: Sequence[RLRecord],
    seed: int,
    shuffle: bool = True,
    *,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    load_media: bool = True,
    num_frames: int = 16,
) -> grain.MapDataset:
    """RL/eval queries as a grain MapDataset of `LoadRLMedia` dicts (or bare records).

    Args:
      records: parsed RLRecords.
      seed: shuffle seed (also what reshuffles each epoch).
      shuffle: shuffle each epoch; False keeps file order.
      num_epochs: passes over the records; None repeats forever.
      process_index, process_count: shard `[index::count]` of the global stream; None = jax's values.
      load_media: decode images/frames lazily in `.map`; False yields the records themselves.
      num_frames: frames sampled per video.
    """
    load = LoadRLMedia(num_frames) if load_media else None
    return _pipeline(records, seed, shuffle, num_epochs, process_index, process_count, load)


def sft_dataset(
    records: Sequence[SFTRecord],
    seed: int,
    shuffle: bool = True,
    *,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    load_media: bool = True,
) -> grain.MapDataset:
    """SFT trajectories as a MapDataset of `LoadSFTMedia` dicts (or bare records); args as rl_dataset."""
    load = LoadSFTMedia() if load_media else None
    return _pipeline(records, seed, shuffle, num_epochs, process_index, process_count, load)


def make_iterator(
    ds: grain.MapDataset, *, num_threads: int = 0, prefetch_buffer_size: int = 0
) -> grain.DatasetIterator:
    """An iterator over `ds`; `get_state()` is a JSON-able dict and `set_state()` resumes exactly there.

    Threads decode ahead of the consumer; the state still counts only what was consumed. The defaults
    (no threads) suit tests and the 2-core CPU; raise both on real hosts.
    """
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    return iter(ds.to_iter_dataset(options))
