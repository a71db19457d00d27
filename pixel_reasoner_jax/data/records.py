"""Typed PixelReasoner records (RL/eval rows, SFT trajectories), their parsers, media loaders, SFT loss rule.

Bad rows are counted in a DataReport and skipped; only a missing/unreadable file or an empty result raises.
"""

import dataclasses
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixel_reasoner_jax.processing.vision import to_rgb

logger = logging.getLogger(__name__)

MIN_SIDE = 28  # one merged Qwen2.5-VL patch; smaller images cannot be tokenized
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
ROLES = ("system", "user", "assistant")
CHECK_MODES = ("none", "exists", "verify")
MASK_MODES = ("final_turns", "per_turn")
_EXAMPLES_PER_REASON = 3


class BadMediaError(ValueError):
    """An image or video file that is missing, corrupt, or too small to use."""


class _BadRecord(Exception):
    """Internal: why one row is skipped (`reason` is the DataReport key)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
      benchmark: `row["benchmark"]` when present, else `qid.split("-")[0]`.
      extra: every other key of the row (e.g. the synthetic generator's `target_box`), untouched.
    """

    qid: str
    question: str
    images: list[str]
    is_video: bool
    answer: str | list[str]
    benchmark: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


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


@dataclasses.dataclass
class DataReport:
    """What a parse kept and skipped: per-reason counts and a few example ids per reason.

    Reasons: bad_json (a JSONL line that does not parse), wrong_type (a row, field, message or content
    item of the wrong type), missing_field, empty_question, bad_messages (no user turn or not ending
    with an assistant turn), missing_media (path does not exist), bad_media (corrupt, or a side < 28 px).
    """

    source: str
    total: int = 0
    kept: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add_skip(self, reason: str, row_id: str, detail: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES_PER_REASON:
            shown.append(f"{row_id} ({detail})")

    def summary(self) -> str:
        lines = [f"{self.source}: kept {self.kept} of {self.total} records"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count} x {reason}, e.g. {'; '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)

    def log(self) -> None:
        (logger.warning if self.skipped else logger.info)(self.summary())


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


# ----------------------------------------------------------------------------------------------- files


class _BadJsonLine(str):
    """Marks a JSONL line that did not parse (kept as a row so it is counted, not lost)."""


def read_rows(path: str | os.PathLike) -> list[Any]:
    """Rows of a JSON list, a JSONL file, or (when pyarrow imports) a parquet file.

    An unparseable JSONL line becomes a `_BadJsonLine` string so the caller counts it instead of losing it.

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: the file cannot be read as a whole (bad JSON document, parquet without pyarrow, ...).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ValueError(
                f"cannot read {path!r}: parquet needs pyarrow, which is not installed; convert it to JSONL "
                "(one JSON object per line) or install pyarrow"
            ) from e
        return pq.read_table(path).to_pylist()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read data file {path!r}: {e}") from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"data file {path!r} starts like a JSON list but does not parse: {e}") from e
        return rows
    rows: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(_BadJsonLine(f"line {lineno}: {e.msg}"))
    return rows


def _row_id(row: Any, index: int, stem: str) -> str:
    if isinstance(row, dict):
        for key in ("qid", "id"):
            if isinstance(row.get(key), str | int) and not isinstance(row.get(key), bool):
                return str(row[key])
    return f"{stem}-{index}"


def _parse_all(path, parse_one, kind: str):
    rows = read_rows(path)
    report = DataReport(source=f"{kind} {path}", total=len(rows))
    stem = Path(path).stem
    out = []
    for i, row in enumerate(rows):
        row_id = _row_id(row, i, stem)
        try:
            if isinstance(row, _BadJsonLine):
                raise _BadRecord("bad_json", str(row))
            if not isinstance(row, dict):
                raise _BadRecord("wrong_type", f"row is {type(row).__name__}, expected an object")
            out.append(parse_one(row, row_id))
        except _BadRecord as e:
            report.add_skip(e.reason, row_id, e.detail)
    report.kept = len(out)
    report.log()
    if not out:
        raise ValueError(f"no usable {kind} record in {path!r}:\n{report.summary()}")
    return out, report


def _media(paths: list[str], data_root: str, check: str) -> list[str]:
    resolved = [resolve_path(p, data_root) for p in paths]
    for p in resolved:
        try:
            check_media(p, check)
        except BadMediaError as e:
            reason = "missing_media" if not os.path.exists(p) else "bad_media"
            raise _BadRecord(reason, str(e)) from e
    return resolved


# ------------------------------------------------------------------------------------------------- RL


def _rl_from_row(row: dict, row_id: str, data_root: str, check: str) -> RLRecord:
    for key in ("question", "image", "answer", "qid"):
        if key not in row or row[key] is None:
            raise _BadRecord("missing_field", f"no {key!r}")
    qid, question, images, answer = row["qid"], row["question"], row["image"], row["answer"]
    if isinstance(qid, bool) or not isinstance(qid, str | int):
        raise _BadRecord("wrong_type", f"qid is {type(qid).__name__}, expected str")
    if not isinstance(question, str):
        raise _BadRecord("wrong_type", f"question is {type(question).__name__}, expected str")
    if not question.strip():
        raise _BadRecord("empty_question", "question is blank")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        raise _BadRecord("wrong_type", "image must be a non-empty list of path strings")
    # Counts are sometimes stored as numbers; they compare as their decimal text.
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    ok_list = isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)
    if not (isinstance(answer, str) or ok_list):
        raise _BadRecord("wrong_type", f"answer is {type(answer).__name__}, expected str or list of str")
    is_video = row.get("is_video")
    if is_video is None:
        # Without the flag only a single-image row is unambiguous.
        if len(images) != 1:
            raise _BadRecord("missing_field", "no 'is_video' on a row with several media paths")
        is_video = False
    if not isinstance(is_video, bool | np.bool_):
        raise _BadRecord("wrong_type", f"is_video is {type(is_video).__name__}, expected bool")
    benchmark = row.get("benchmark")
    if not isinstance(benchmark, str) or not benchmark:
        benchmark = str(qid).split("-")[0]
    extra = {k: v for k, v in row.items() if k not in ("question", "image", "answer", "qid", "is_video")}
    return RLRecord(
        qid=str(qid),
        question=question,
        images=_media(images, data_root, check),
        is_video=bool(is_video),
        answer=answer,
        benchmark=benchmark,
        extra=extra,
    )


def load_rl_records(
    path: str | os.PathLike, data_root: str | os.PathLike | None = None, *, check: str = "verify"
) -> tuple[list[RLRecord], DataReport]:
    """Parses an RL or eval file (columns question, image, is_video, answer, qid).

    Args:
      path: a JSONL file, a JSON list, or a parquet file (needs pyarrow).
      data_root: relative media paths are joined to it; default: the file's directory.
      check: media check per path, one of "none", "exists", "verify" (see `check_media`).

    Returns:
      The usable records and the report of the skipped ones (also logged once).

    Raises:
      FileNotFoundError / ValueError: the file is missing or unreadable, or no record survives.
    """
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    root = str(data_root) if data_root is not None else os.path.dirname(os.path.abspath(path))
    return _parse_all(str(path), lambda row, rid: _rl_from_row(row, rid, root, check), "RL")


# ------------------------------------------------------------------------------------------------ SFT


def _content_items(content: Any, data_root: str, check: str, media: list[str]) -> tuple[list[dict], bool]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}], False
    if not isinstance(content, list):
        raise _BadRecord("wrong_type", f"message content is {type(content).__name__}, expected str or list")
    items, has_video = [], False
    for item in content:
        if not isinstance(item, dict):
            raise _BadRecord("wrong_type", f"content item is {type(item).__name__}, expected an object")
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
                raise _BadRecord("wrong_type", "video item must hold a path or a list of frame paths")
            resolved = _media(paths, data_root, check)
            media.extend(resolved)
            has_video = True
            items.append(
                {**item, "type": "video", "video": resolved if isinstance(value, list) else resolved[0]}
            )
        else:
            raise _BadRecord("wrong_type", f"content item {str(item)[:80]!r} is not a text/image/video item")
    return items, has_video


def _sft_from_row(row: dict, row_id: str, data_root: str, check: str) -> SFTRecord:
    if "message_list" not in row:
        raise _BadRecord("missing_field", "no 'message_list'")
    raw = row["message_list"]
    if not isinstance(raw, list) or not raw:
        raise _BadRecord("wrong_type", "message_list must be a non-empty list")
    messages, media, is_video = [], [], False
    for m in raw:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _BadRecord("missing_field", "a message lacks 'role' or 'content'")
        if m["role"] not in ROLES:
            raise _BadRecord("wrong_type", f"role {m['role']!r} is not one of {ROLES}")
        if "loss" in m and not isinstance(m["loss"], bool):
            raise _BadRecord("wrong_type", f"'loss' is {type(m['loss']).__name__}, expected bool")
        items, vid = _content_items(m["content"], data_root, check, media)
        is_video |= vid
        messages.append({**m, "content": items})
    roles = [m["role"] for m in messages]
    if "user" not in roles or roles[-1] != "assistant":
        raise _BadRecord("bad_messages", f"roles {roles}: need a user turn and a final assistant turn")
    first_user = messages[roles.index("user")]
    if not any(it["type"] == "text" and it["text"].strip() for it in first_user["content"]):
        raise _BadRecord("empty_question", "the first user turn has no text")
    extra = {k: v for k, v in row.items() if k != "message_list"}
    return SFTRecord(qid=row_id, messages=messages, images=media, is_video=is_video, extra=extra)


def load_sft_records(
    path: str | os.PathLike, data_root: str | os.PathLike | None = None, *, check: str = "verify"
) -> tuple[list[SFTRecord], DataReport]:
    """Parses an SFT file whose rows carry a `message_list` trajectory (JSON list, JSONL or parquet).

    Args and raises: as `load_rl_records`.
    """
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    root = str(data_root) if data_root is not None else os.path.dirname(os.path.abspath(path))
    return _parse_all(str(path), lambda row, rid: _sft_from_row(row, rid, root, check), "SFT")


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
