"""Seeds of trajectory synthesis: a question with its answer and where the answer is (an image box or a
video frame window), read from our JSONL or adapted from common layouts; bad seeds are counted and skipped.

Formats: "jsonl" (ours), "vstar" (V*/SEAL-style per-image annotation JSON, pixel [x, y, w, h] boxes, correct
option first), "webpage" (screenshot + question + answer + pixel answer box [x1, y1, x2, y2]).
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixel_reasoner_jax.data.records import (
    IMAGE_SUFFIXES,
    BadMediaError,
    DataReport,
    check_media,
    list_frame_files,
    resolve_path,
)
from pixel_reasoner_jax.data.tables import read_rows

SEED_FORMATS = ("jsonl", "vstar", "webpage")


@dataclasses.dataclass(frozen=True)
class Seed:
    """One synthesis seed.

    Attributes:
      id: unique within the seed file.
      question: the question as the user turn shows it.
      answer: one accepted answer or a list of them (checked with the project's answer matcher).
      image: the image path (image seed) or None.
      box: normalized [x1, y1, x2, y2] of the region that holds the answer (image seed).
      frames: the video's frame paths in order (video seed) or None.
      window: 1-based [first, last] frames (inclusive) that show the answer (video seed).
      size: (width, height) of the image or of the first frame.
    """

    id: str
    question: str
    answer: str | list[str]
    image: str | None = None
    box: tuple[float, float, float, float] | None = None
    frames: tuple[str, ...] | None = None
    window: tuple[int, int] | None = None
    size: tuple[int, int] = (0, 0)

    @property
    def is_video(self) -> bool:
        return self.frames is not None


class BadSeed(Exception):
    """Why one seed row is skipped (`reason` is the DataReport key)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _image_size(path: str) -> tuple[int, int]:
    try:
        check_media(path, "verify")
        with Image.open(path) as img:
            return img.size
    except BadMediaError as e:
        raise BadSeed("missing_media" if not os.path.exists(path) else "bad_media", str(e)) from e


def _answer(value: Any) -> str | list[str]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # counts stored as numbers compare as their text
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(a, str) and a.strip() for a in value):
        return value
    raise BadSeed("bad_answer", f"answer must be a non-empty string or list of strings, got {value!r}")


def _numbers(value: Any, n: int, what: str) -> list[float]:
    ok = isinstance(value, list | tuple) and len(value) == n
    ok = ok and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise BadSeed("bad_box", f"{what} must be {n} finite numbers, got {value!r}")
    return [float(v) for v in value]


def _native(row: dict, root: str, num_frames: int) -> Seed:
    """A row of our JSONL: {"id", "question", "answer", "image" + "box" | "video" + "frames"}."""
    sid = row.get("id")
    if isinstance(sid, bool) or not isinstance(sid, str | int) or not str(sid).strip():
        raise BadSeed("missing_field", f"id must be a non-empty string, got {sid!r}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadSeed("empty_question", f"question must be a non-empty string, got {question!r}")
    answer = _answer(row.get("answer"))
    if ("image" in row) == ("video" in row):
        raise BadSeed("missing_field", "a seed holds exactly one of 'image' and 'video'")
    if "image" in row:
        if not isinstance(row["image"], str) or not row["image"]:
            raise BadSeed("missing_field", f"image must be a path string, got {row['image']!r}")
        path = resolve_path(row["image"], root)
        size = _image_size(path)
        box = _numbers(row.get("box"), 4, "box")
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
            raise BadSeed("bad_box", f"box {box} must be normalized [x1, y1, x2, y2] with 0 <= x1 < x2 <= 1")
        return Seed(str(sid), question, answer, image=path, box=tuple(box), size=size)
    video = row["video"]
    if isinstance(video, str) and os.path.isdir(resolve_path(video, root)):
        frames = list_frame_files(resolve_path(video, root))
    elif isinstance(video, list) and video and all(isinstance(p, str) and p for p in video):
        frames = [resolve_path(p, root) for p in video]
    else:
        raise BadSeed("missing_field", "video must be a list of frame paths or a frame directory")
    if len(frames) != num_frames:
        raise BadSeed("bad_video", f"video has {len(frames)} frames; the prompt format needs {num_frames}")
    sizes = {_image_size(p) for p in frames}
    if len(sizes) != 1:
        raise BadSeed("bad_video", f"frames differ in size: {sorted(sizes)}")
    window = row.get("frames")
    ok = isinstance(window, list) and len(window) == 2 and all(type(f) is int for f in window)
    if not ok or not 1 <= window[0] <= window[1] <= num_frames:
        raise BadSeed("bad_frames", f"frames must be [first, last] within [1, {num_frames}], got {window!r}")
    return Seed(str(sid), question, answer, frames=tuple(frames), window=tuple(window), size=sizes.pop())


def _pixel_to_native(row: dict, sid: str, image: str, box_px: list[float], root: str) -> dict:
    path = resolve_path(image, root)
    w, h = _image_size(path)
    x1, y1, x2, y2 = box_px
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise BadSeed("bad_box", f"pixel box {box_px} must have 0 <= x1 < x2 and 0 <= y1 < y2")
    box = [x1 / w, y1 / h, min(x2, w) / w, min(y2, h) / h]
    return {
        "id": sid,
        "question": row.get("question"),
        "answer": row.get("answer"),
        "image": path,
        "box": box,
    }


def _vstar(row: dict, root: str, num_frames: int) -> Seed:
    """V*/SEAL layout: "bbox" [[x, y, w, h], ...] in pixels (the union is the target), "options" with the
    correct one first (shuffled here into lettered choices, V*'s eval style), "image" or the sibling file."""
    image = row.get("image") or row.get("_sibling_image")
    if not isinstance(image, str) or not image:
        raise BadSeed("missing_field", "no image path and no image file beside the annotation")
    boxes = row.get("bbox")
    if not isinstance(boxes, list) or not boxes:
        raise BadSeed("bad_box", f"bbox must be a non-empty list of [x, y, w, h], got {boxes!r}")
    xywh = [_numbers(b, 4, "bbox entry") for b in boxes]
    union = [min(b[0] for b in xywh), min(b[1] for b in xywh)]
    union += [max(b[0] + b[2] for b in xywh), max(b[1] + b[3] for b in xywh)]
    options = row.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise BadSeed("bad_answer", f"options must list at least 2 strings, correct first, got {options!r}")
    sid = str(row.get("id") or row.get("_stem") or Path(image).stem)
    # The correct option is first in the files; a per-seed shuffle keeps it from always being A.
    order = np.random.default_rng(list(sid.encode())).permutation(len(options))
    letters = [chr(ord("A") + i) for i in range(len(options))]
    choices = "\n".join(f"{letters[i]}: {options[j]}" for i, j in enumerate(order))
    native = _pixel_to_native(row, sid, image, union, root)
    native["question"] = f"{row.get('question')}\nchoices:\n{choices}"
    native["answer"] = letters[int(np.flatnonzero(order == 0)[0])]
    return _native(native, root, num_frames)


def _webpage(row: dict, root: str, num_frames: int) -> Seed:
    """A screenshot with a question, its answer and the pixel box [x1, y1, x2, y2] of the answer."""
    image = row.get("screenshot", row.get("image"))
    if not isinstance(image, str) or not image:
        raise BadSeed("missing_field", "no 'screenshot' (or 'image') path")
    box = _numbers(row.get("answer_bbox", row.get("bbox")), 4, "answer_bbox")
    sid = row.get("id")
    if isinstance(sid, bool) or not isinstance(sid, str | int):
        raise BadSeed("missing_field", f"id must be a string, got {sid!r}")
    return _native(_pixel_to_native(row, str(sid), image, box, root), root, num_frames)


_ADAPTERS: dict[str, Callable[[dict, str, int], Seed]] = {
    "jsonl": _native,
    "vstar": _vstar,
    "webpage": _webpage,
}


def _annotation_dir(path: str) -> list[Any]:
    """A V* folder: one JSON per image, the image beside it with the same stem."""
    rows: list[Any] = []
    for name in sorted(os.listdir(path)):
        if not name.endswith(".json"):
            continue
        stem = name[: -len(".json")]
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                row = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            rows.append(("bad_json", f"{name}: {e}"))
            continue
        if isinstance(row, dict):
            sibling = next(
                (stem + s for s in IMAGE_SUFFIXES if os.path.exists(os.path.join(path, stem + s))), None
            )
            row = {"_stem": stem, **({"_sibling_image": sibling} if sibling else {}), **row}
        rows.append(row)
    return rows


def load_seeds(
    path: str | os.PathLike, fmt: str = "jsonl", data_root: str | None = None, num_frames: int = 16
) -> tuple[list[Seed], DataReport]:
    """Reads and checks every seed (media opened, boxes and windows validated).

    Args:
      path: a JSONL / JSON list / parquet file, or for "vstar" also a folder of per-image JSON files.
      fmt: one of SEED_FORMATS.
      data_root: relative media paths resolve against it; default: the file's folder (or the folder).
      num_frames: frames a video seed must have (16 in the original's prompts).

    Returns:
      The usable seeds and the report of the skipped ones (reasons: bad_json, wrong_type, missing_field,
      empty_question, bad_answer, bad_box, bad_frames, bad_video, missing_media, bad_media, duplicate_id).

    Raises:
      FileNotFoundError / ValueError: the source is missing or unreadable, or an unknown format.
    """
    if fmt not in _ADAPTERS:
        raise ValueError(f"seed format must be one of {SEED_FORMATS}, got {fmt!r}")
    path = str(path)
    if os.path.isdir(path):
        if fmt != "vstar":
            raise ValueError(f"seed path {path!r} is a folder; only the 'vstar' format reads a folder")
        rows, root = _annotation_dir(path), data_root or path
    else:
        rows, root = read_rows(path), data_root or os.path.dirname(os.path.abspath(path))
    report = DataReport(source=f"seeds {path}", total=len(rows))
    seeds, seen = [], set()
    for i, row in enumerate(rows):
        rid = str(row.get("id", i)) if isinstance(row, dict) else str(i)
        try:
            if isinstance(row, tuple):
                raise BadSeed(*row)
            if not isinstance(row, dict):
                raise BadSeed(
                    "bad_json" if isinstance(row, str) else "wrong_type", f"row {i}: {str(row)[:80]}"
                )
            seed = _ADAPTERS[fmt](row, str(root), num_frames)
            if seed.id in seen:
                raise BadSeed("duplicate_id", f"id {seed.id!r} appears again")
        except BadSeed as e:
            report.add_skip(e.reason, rid, e.detail)
            continue
        seen.add(seed.id)
        seeds.append(seed)
    report.kept = len(seeds)
    report.log()
    return seeds, report
