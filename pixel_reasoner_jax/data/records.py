"""Typed PixelReasoner records (RL/eval rows, SFT trajectories), their parsers, media loaders, SFT loss rule.

Bad rows are counted in a DataReport (data/tables.py) and skipped; only a missing/unreadable file or an empty
result raises.
"""

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixel_reasoner_jax.data.tables import BadRecord, Column, DataReport, parse_sources
from pixel_reasoner_jax.processing.vision import to_rgb

MIN_SIDE = 28  # one merged Qwen2.5-VL patch; smaller images cannot be tokenized
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
ROLES = ("system", "user", "assistant")
CHECK_MODES = ("none", "exists", "verify")
MASK_MODES = ("final_turns", "per_turn")
# The published RL/eval schema (reference §7.2/§7.3); the optional columns are ours.
RL_COLUMNS = (
    Column("question", ("string",)),
    Column("image", ("string", "list<string>")),
    Column("answer", ("string", "list<string>", "integer", "floating")),
    Column("qid", ("string", "integer")),
    Column("is_video", ("bool",), required=False),
    Column("benchmark", ("string",), required=False),
    Column("category", ("string",), required=False),
    Column("target_box", ("list<floating>", "list<integer>"), required=False),
)
SFT_COLUMNS = (Column("message_list"),)


class BadMediaError(ValueError):
    """An image or video file that is missing, corrupt, or too small to use."""


@dataclasses.dataclass(frozen=True)
class RLRecord:
    """One RL or eval query (reference §7.2/§7.3).

    Attributes:
      qid: the dataset id; the benchmark is its part before the first '-'.
      question: the raw question text (templates are added by the prompt code, not here).
      images: resolved media paths: one image, several images, or a video's frames in order (or one video
        file / frame directory when `is_video`).
      is_video: whether `images` is one video.
      answer: one acceptable answer or a list of them.
      benchmark: `row["benchmark"]` when present, else `qid.split("-")[0]` (as written; eval records carry
        the canonical name, see data/benchmarks.py).
      extra: every other key of the row (e.g. the synthetic generator's `target_color`), untouched.
      category: the question type within its benchmark (V*: direct_attributes / relative_position,
        MVBench: its task, synthetic: the task kind), or None where the data does not say.
      target_box: where the answer is, as fractions [x1, y1, x2, y2] of the original image (of each frame
        for a video), or None; for crop-faithfulness metrics.
    """

    qid: str
    question: str
    images: list[str]
    is_video: bool
    answer: str | list[str]
    benchmark: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    category: str | None = None
    target_box: tuple[float, float, float, float] | None = None


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    """One SFT trajectory (reference §7.1).

    Attributes:
      qid: `qid` or `id` of the row, else `<file stem>-<row index>`.
      messages: Qwen-style messages; every content is a list of items `{"type": "text", "text"}`,
        `{"type": "image", "image": path}` or `{"type": "video", "video": [frame paths]}` with paths
        resolved; other message keys (such as `loss`) are kept.
      images: every media path in order of appearance; a video item contributes its frames in order.
      is_video: whether the trajectory contains a video item.
      extra: every row key except `message_list`, untouched.
    """

    qid: str
    messages: list[dict[str, Any]]
    images: list[str]
    is_video: bool
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- media


def _natural_key(path: str) -> list:
    # frame_2 before frame_10: numeric runs compare as numbers
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decodes one image file to RGB (transparency on white).

    Raises:
      BadMediaError: the file is missing, not a decodable image, or a side is under 28 px.
    """
    path = str(path)
    try:
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
            if rgb is img:
                rgb = img.copy()
    except FileNotFoundError as e:
        raise BadMediaError(f"image file {path!r} does not exist") from e
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise BadMediaError(f"image file {path!r} is not a decodable image: {e}") from e
    if min(rgb.size) < MIN_SIDE:
        raise BadMediaError(
            f"image file {path!r} is {rgb.width}x{rgb.height}; each side must be >= {MIN_SIDE} px"
        )
    return rgb


def _sample_uniform(items: list, num_frames: int, what: str) -> list:
    if len(items) < num_frames:
        raise BadMediaError(f"video {what} has {len(items)} frames; expected at least {num_frames}")
    idx = np.linspace(0, len(items) - 1, num_frames).round().astype(int)
    return [items[i] for i in idx]


def _decode_video_file(path: str) -> list[Image.Image]:
    import av  # imported here: only video readers need the FFmpeg bindings

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadMediaError(f"video file {path!r} has no video stream")
            return [f.to_image() for f in container.decode(video=0)]
    except FileNotFoundError as e:
        raise BadMediaError(f"video file {path!r} does not exist") from e
    except av.FFmpegError as e:
        raise BadMediaError(f"video file {path!r} could not be decoded: {e}") from e


def list_frame_files(directory: str | os.PathLike) -> list[str]:
    """The image files of a frame directory in natural order (frame_2 before frame_10)."""
    names = [n for n in os.listdir(directory) if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted((os.path.join(directory, n) for n in names), key=_natural_key)


def load_video_frames(
    video: str | os.PathLike | Sequence[str | os.PathLike], num_frames: int = 16
) -> list[Image.Image]:
    """`num_frames` RGB frames sampled uniformly (linspace over all frames, rounded) from a video.

    Args:
      video: a list of frame image paths (kept in the given order), a directory of frame images (natural
        order), or a video file decoded with PyAV.
      num_frames: how many frames to return.

    Raises:
      BadMediaError: a missing/corrupt file or frame, or fewer frames than `num_frames`.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(video, str | os.PathLike):
        path = str(video)
        if os.path.isdir(path):
            frames = list_frame_files(path)
            return [load_image(p) for p in _sample_uniform(frames, num_frames, f"directory {path!r}")]
        if not os.path.exists(path):
            raise BadMediaError(f"video {path!r} does not exist")
        decoded = _decode_video_file(path)
        frames = _sample_uniform(decoded, num_frames, f"file {path!r}")
        if min(frames[0].size) < MIN_SIDE:
            raise BadMediaError(
                f"video file {path!r} frames are {frames[0].size}; sides must be >= {MIN_SIDE} px"
            )
        return [f.convert("RGB") for f in frames]
    paths = [str(p) for p in video]
    return [load_image(p) for p in _sample_uniform(paths, num_frames, f"frame list starting {paths[:1]}")]


def check_media(path: str, mode: str) -> None:
    """Cheap validity check used while parsing.

    "exists": the path exists; "verify": also reads the image header and checksums (PIL `verify`) and the
    size, or opens a video container; "none": nothing.

    Raises:
      BadMediaError: the check failed.
    """
    if mode == "none":
        return
    if not os.path.exists(path):
        raise BadMediaError(f"media file {path!r} does not exist")
    if mode == "exists" or os.path.isdir(path):
        return
    if path.lower().endswith(VIDEO_SUFFIXES):
        import av

        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise BadMediaError(f"video file {path!r} has no video stream")
        except av.FFmpegError as e:
            raise BadMediaError(f"video file {path!r} could not be opened: {e}") from e
        return
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise BadMediaError(f"image file {path!r} is corrupt: {e}") from e
    if min(size) < MIN_SIDE:
        raise BadMediaError(f"image file {path!r} is {size[0]}x{size[1]}; each side must be >= {MIN_SIDE} px")


def resolve_path(path: str, data_root: str) -> str:
    """An absolute path stays; a relative one is joined to `data_root` (no other guessing)."""
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(data_root, path))


def _media(paths: list[str], data_root: str, check: str) -> list[str]:
    resolved = [resolve_path(p, data_root) for p in paths]
    for p in resolved:
        try:
            check_media(p, check)
        except BadMediaError as e:
            reason = "missing_media" if not os.path.exists(p) else "bad_media"
            raise BadRecord(reason, str(e)) from e
    return resolved


# ------------------------------------------------------------------------------------------------- RL


def rl_from_row(row: dict, row_id: str, data_root: str, check: str) -> RLRecord:
    """One RL/eval row as an RLRecord, media resolved against `data_root` and checked (`check_media`).

    Raises:
      BadRecord: the row is unusable; its reason is the DataReport key.
    """
    for key in ("question", "image", "answer", "qid"):
        if key not in row or row[key] is None:
            raise BadRecord("missing_field", f"no {key!r}")
    qid, question, images, answer = row["qid"], row["question"], row["image"], row["answer"]
    if isinstance(qid, bool) or not isinstance(qid, str | int):
        raise BadRecord("wrong_type", f"qid is {type(qid).__name__}, expected str")
    if not isinstance(question, str):
        raise BadRecord("wrong_type", f"question is {type(question).__name__}, expected str")
    if not question.strip():
        raise BadRecord("empty_question", "question is blank")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        raise BadRecord("wrong_type", "image must be a non-empty list of path strings")
    # Counts are sometimes stored as numbers; they compare as their decimal text.
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    ok_list = isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)
    if not (isinstance(answer, str) or ok_list):
        raise BadRecord("wrong_type", f"answer is {type(answer).__name__}, expected str or list of str")
    is_video = row.get("is_video")
    if is_video is None:
        # Without the flag only a single-image row is unambiguous.
        if len(images) != 1:
            raise BadRecord("missing_field", "no 'is_video' on a row with several media paths")
        is_video = False
    if not isinstance(is_video, bool | np.bool_):
        raise BadRecord("wrong_type", f"is_video is {type(is_video).__name__}, expected bool")
    benchmark = row.get("benchmark")
    if not isinstance(benchmark, str) or not benchmark:
        benchmark = str(qid).split("-")[0]
    category = row.get("category")
    if category is not None and not (isinstance(category, str) and category):
        raise BadRecord("wrong_type", f"category is {category!r}, expected a non-empty str")
    fields = {c.name for c in RL_COLUMNS}
    extra = {k: v for k, v in row.items() if k not in fields - {"benchmark"}}
    return RLRecord(
        qid=str(qid),
        question=question,
        images=_media(images, data_root, check),
        is_video=bool(is_video),
        answer=answer,
        benchmark=benchmark,
        extra=extra,
        category=category,
        target_box=_target_box(row.get("target_box")),
    )


def _target_box(value: Any) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 4
    ok = ok and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok or not (0 <= value[0] < value[2] <= 1 and 0 <= value[1] < value[3] <= 1):
        raise BadRecord(
            "bad_box", f"target_box {value!r} is not fractions [x1, y1, x2, y2], x1 < x2, y1 < y2"
        )
    return tuple(float(v) for v in value)


def media_root(data_root: str | os.PathLike | None, file: str) -> str:
    """What relative media paths of `file`'s rows resolve against: `data_root`, else the file's folder."""
    return str(data_root) if data_root is not None else os.path.dirname(os.path.abspath(file))


def load_rl_records(
    path: str | os.PathLike, data_root: str | os.PathLike | None = None, *, check: str = "verify"
) -> tuple[list[RLRecord], DataReport]:
    """Parses RL or eval rows (columns question, image, is_video, answer, qid; optional benchmark,
    category, target_box).

    Args:
      path: JSONL, JSON-list or parquet files and folders of them, comma-separated (see
        tables.source_files), e.g. the RL data's `release.parquet`.
      data_root: relative media paths are joined to it; default: the directory of each row's file.
      check: media check per path, one of "none", "exists", "verify" (see `check_media`).

    Returns:
      The usable records and the report of the skipped ones (also logged once).

    Raises:
      FileNotFoundError / ValueError: a file is missing or unreadable, or no record survives.
    """
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    parse = lambda row, rid, file: rl_from_row(row, rid, media_root(data_root, file), check)
    return parse_sources(path, parse, "RL", RL_COLUMNS)


# ------------------------------------------------------------------------------------------------ SFT


def _content_items(content: Any, data_root: str, check: str, media: list[str]) -> tuple[list[dict], bool]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}], False
    if not isinstance(content, list):
        raise BadRecord("wrong_type", f"message content is {type(content).__name__}, expected str or list")
    items, has_video = [], False
    for item in content:
        if not isinstance(item, dict):
            raise BadRecord("wrong_type", f"content item is {type(item).__name__}, expected an object")
        kind = item.get("type") or next((k for k in ("text", "image", "video") if k in item), None)
        value = item.get(kind) if kind in ("text", "image", "video") else None
        if kind == "text" and isinstance(value, str):
            items.append({**item, "type": "text", "text": value})
        elif kind == "image" and isinstance(value, str) and value:
            (path,) = _media([value], data_root, check)
            media.append(path)
            items.append({**item, "type": "image", "image": path})
        elif kind == "video" and isinstance(value, str | list) and value:
            paths = [value] if isinstance(value, str) else value
            if not all(isinstance(p, str) and p for p in paths):
                raise BadRecord("wrong_type", "video item must hold a path or a list of frame paths")
            resolved = _media(paths, data_root, check)
            media.extend(resolved)
            has_video = True
            items.append(
                {**item, "type": "video", "video": resolved if isinstance(value, list) else resolved[0]}
            )
        else:
            raise BadRecord("wrong_type", f"content item {str(item)[:80]!r} is not a text/image/video item")
    return items, has_video


def _sft_from_row(row: dict, row_id: str, data_root: str, check: str) -> SFTRecord:
    if "message_list" not in row:
        raise BadRecord("missing_field", "no 'message_list'")
    raw = row["message_list"]
    if not isinstance(raw, list) or not raw:
        raise BadRecord("wrong_type", "message_list must be a non-empty list")
    messages, media, is_video = [], [], False
    for m in raw:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord("missing_field", "a message lacks 'role' or 'content'")
        if m["role"] not in ROLES:
            raise BadRecord("wrong_type", f"role {m['role']!r} is not one of {ROLES}")
        if "loss" in m and not isinstance(m["loss"], bool):
            raise BadRecord("wrong_type", f"'loss' is {type(m['loss']).__name__}, expected bool")
        items, vid = _content_items(m["content"], data_root, check, media)
        is_video |= vid
        messages.append({**m, "content": items})
    roles = [m["role"] for m in messages]
    if "user" not in roles or roles[-1] != "assistant":
        raise BadRecord("bad_messages", f"roles {roles}: need a user turn and a final assistant turn")
    first_user = messages[roles.index("user")]
    if not any(it["type"] == "text" and it["text"].strip() for it in first_user["content"]):
        raise BadRecord("empty_question", "the first user turn has no text")
    extra = {k: v for k, v in row.items() if k != "message_list"}
    return SFTRecord(qid=row_id, messages=messages, images=media, is_video=is_video, extra=extra)


def load_sft_records(
    path: str | os.PathLike, data_root: str | os.PathLike | None = None, *, check: str = "verify"
) -> tuple[list[SFTRecord], DataReport]:
    """Parses SFT rows that carry a `message_list` trajectory (JSON list, JSONL or parquet files/folders).

    Args and raises: as `load_rl_records`.
    """
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    parse = lambda row, rid, file: _sft_from_row(row, rid, media_root(data_root, file), check)
    return parse_sources(path, parse, "SFT", SFT_COLUMNS)


# -------------------------------------------------------------------------------------- SFT loss mask


def assistant_turn_mask(messages: Sequence[dict[str, Any]], mode: str = "final_turns") -> list[bool]:
    """Per message: whether its assistant turn is trained.

    Modes:
      "final_turns": the original's positional rule (instruction_tuning/sft_tooltrainer.py). It renders the
        messages plus the empty generation prompt and trains the turns opening at the 2nd-to-last and
        4th-to-last `<|im_start|>`, each only if that turn is an assistant turn. In message terms:
        `messages[-1]` and `messages[-3]` when their role is "assistant". So a tool trajectory trains
        its last two assistant turns (the self-correction's erroneous call, and the first crop of a
        two-step zoom, get none) and a textual one [system, user, assistant] trains its single turn.
        (The original also trains the `<|im_start|>assistant\\n` header; that is the renderer's concern.)
      "per_turn": every assistant turn unless the message says `"loss": false`.

    Raises:
      ValueError: an unknown mode.
    """
    roles = [m.get("role") for m in messages]
    if mode == "final_turns":
        mask = [False] * len(messages)
        for k in (len(messages) - 1, len(messages) - 3):
            if k >= 0 and roles[k] == "assistant":
                mask[k] = True
        return mask
    if mode == "per_turn":
        return [r == "assistant" and m.get("loss", True) is not False for r, m in zip(roles, messages)]
    raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
