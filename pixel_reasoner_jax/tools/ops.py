"""Visual operations of Pixel Reasoner (crop_image, select_frames) as pure functions on a VisualState.

Bad arguments from the model never raise: they come back as a ToolResult with ok=False and an error text.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image

from pixel_reasoner_jax.processing.vision import resize_to_limits, to_rgb
from pixel_reasoner_jax.tools.prompts import PromptTemplates

PIX = 28 * 28  # pixel limits below are in units of one merged 28x28 patch, as in the reference
PADDINGS = ("capped", "fixed")
# How a crop's `target_image` counts images after something was returned on a VIDEO query (reference §4.1):
# "original": the original's list [[video], sel1, sel2, ...], so t >= 2 and t picks returned image t - 1
# (one more than the select observation announced); what the released checkpoints were trained with.
# "observed": returned images numbered from 1, as the select observation numbers them.
VIDEO_CROP_INDEXES = ("original", "observed")
FULL_BOX = (0.0, 0.0, 1.0, 1.0)
# Where an image of the conversation comes from: (index of the query's original image, or of the video
# frame, 0-based; normalised [x1, y1, x2, y2] of that original). Crops of crops compose their boxes.
Origin = tuple[int, tuple[float, float, float, float]]
_SHOW_CHARS = 200  # cap on how much of a bad argument an error message quotes


@dataclasses.dataclass(frozen=True)
class OpsConfig:
    """Settings of the visual operations; the defaults are the training rollout of reference §5.

    Attributes:
      crop_min_pixels, crop_max_pixels: a crop is resized (smart_resize) into this pixel range.
      select_min_pixels, select_max_pixels: same for selected frames; both None = frames are not resized.
      padding: "capped" = min(0.1, 600/side) per axis in normalised space (released models, verl-tool);
        "fixed" = 0.1 per axis (the repo's current code). Capped boxes are int-truncated to pixels, fixed
        boxes are rounded, as PIL does with the float box of the current code.
      max_frames: most frames one select_frames call may return.
      min_crop_side: a crop must be strictly larger than this on both sides.
      video_crop_index: numbering of `target_image` after images were returned on a video query, one of
        VIDEO_CROP_INDEXES; default the original's (released checkpoints).
      crop_tool_name: the crop tool's name in messages that recommend it.
      templates: observation texts.
    """

    crop_min_pixels: int = 4 * PIX
    crop_max_pixels: int = 1000 * PIX
    select_min_pixels: int | None = 4 * PIX
    select_max_pixels: int | None = 400 * PIX
    padding: str = "capped"
    max_frames: int = 8
    min_crop_side: int = 28
    video_crop_index: str = "original"
    crop_tool_name: str = "crop_image"
    templates: PromptTemplates = dataclasses.field(default_factory=PromptTemplates)

    def __post_init__(self):
        if self.padding not in PADDINGS:
            raise ValueError(f"OpsConfig.padding must be one of {PADDINGS}, got {self.padding!r}")
        if not 0 < self.crop_min_pixels <= self.crop_max_pixels:
            raise ValueError(
                f"OpsConfig crop pixel range must satisfy 0 < min <= max, got "
                f"[{self.crop_min_pixels}, {self.crop_max_pixels}]"
            )
        if (self.select_min_pixels is None) != (self.select_max_pixels is None):
            raise ValueError(
                "OpsConfig.select_min_pixels and select_max_pixels must both be set or both be None, got "
                f"{self.select_min_pixels!r} and {self.select_max_pixels!r}"
            )
        if self.select_min_pixels is not None and not 0 < self.select_min_pixels <= self.select_max_pixels:
            raise ValueError(
                f"OpsConfig select pixel range must satisfy 0 < min <= max, got "
                f"[{self.select_min_pixels}, {self.select_max_pixels}]"
            )
        if self.video_crop_index not in VIDEO_CROP_INDEXES:
            raise ValueError(
                f"OpsConfig.video_crop_index must be one of {VIDEO_CROP_INDEXES}, got {self.video_crop_index!r}"
            )
        if self.max_frames < 1 or self.min_crop_side < 0:
            raise ValueError(
                f"OpsConfig needs max_frames >= 1 and min_crop_side >= 0, got {self.max_frames}, "
                f"{self.min_crop_side}"
            )

    @classmethod
    def for_eval(cls, **overrides: Any) -> "OpsConfig":
        """Evaluation settings of reference §5: crops in [256, 5120]*784 px, selected frames not resized."""
        values = dict(
            crop_min_pixels=256 * PIX,
            crop_max_pixels=5120 * PIX,
            select_min_pixels=None,
            select_max_pixels=None,
        )
        values.update(overrides)
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class VisualState:
    """The images a conversation holds, in the order the model saw them; never mutated (see apply_result).

    Numbering rule (target_image), reference §4.1, §12.4:
      * Image query: images = originals, then every returned image (crops); target_image t in [1, N] is
        images[t - 1]. Identical to the original.
      * Video query: the video is not an entry of `images`; images holds only returned images (selected
        frames and crops) in the order they arrived. select_frames reports "Numbered a to b" with
        a = (returned images so far) + 1, exactly the original's text. Before anything was returned,
        target_image t in [1, F] picks video frame t (as the original). After that, OpsConfig.video_crop_index
        decides: "original" (default) keeps the original's list [[video], returned...], so t in
        [2, n_returned + 1] picks returned image t - 1, one more than the selection announced; "observed"
        reads t in [1, n_returned] as the returned image the observation numbered t.

    Attributes:
      is_video: the query carries one video (frames) instead of images.
      images: originals (image query) then returned images, as a tuple.
      video_frames: the raw video frames (video query) or None.
      n_original: how many leading entries of `images` are originals (0 for a video).
      n_selected: how many frames select_frames has returned so far.
      seen_sizes: optional (width, height) the model saw for each original image (image query) or each
        video frame (video query). Absolute bbox coordinates on those are read in that size, since the
        model reads its input after the processor's resize; None = the stored image's own size.
      origins: where each entry of `images` comes from (Origin, or None when unknown); filled for the
        originals when empty.
    """

    is_video: bool
    images: tuple[Image.Image, ...] = ()
    video_frames: tuple[Image.Image, ...] | None = None
    n_original: int = 0
    n_selected: int = 0
    seen_sizes: tuple[tuple[int, int], ...] | None = None
    origins: tuple[Origin | None, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "images", tuple(self.images))
        if self.video_frames is not None:
            object.__setattr__(self, "video_frames", tuple(self.video_frames))
        if self.is_video and not self.video_frames:
            raise ValueError("VisualState: a video query needs a non-empty video_frames")
        if not self.is_video and self.video_frames is not None:
            raise ValueError("VisualState: video_frames must be None for an image query")
        if self.is_video and self.n_original != 0:
            raise ValueError(
                f"VisualState: a video query has no original images, got n_original={self.n_original}"
            )
        if not 0 <= self.n_original <= len(self.images):
            raise ValueError(f"VisualState: n_original={self.n_original} outside [0, {len(self.images)}]")
        if self.seen_sizes is not None:
            sizes = tuple((int(w), int(h)) for w, h in self.seen_sizes)
            object.__setattr__(self, "seen_sizes", sizes)
            expected = len(self.video_frames) if self.is_video else self.n_original
            if len(sizes) != expected or any(w <= 0 or h <= 0 for w, h in sizes):
                raise ValueError(
                    f"VisualState: seen_sizes must hold {expected} positive (width, height) pairs, got {sizes}"
                )
        if not self.origins:
            originals = tuple((i, FULL_BOX) for i in range(self.n_original))
            object.__setattr__(self, "origins", originals + (None,) * (len(self.images) - self.n_original))
        if len(self.origins) != len(self.images):
            raise ValueError(f"VisualState: {len(self.origins)} origins for {len(self.images)} images")

    @classmethod
    def for_images(
        cls, images: Sequence[Image.Image], seen_sizes: Sequence[tuple[int, int]] | None = None
    ) -> "VisualState":
        """State of an image query whose originals are `images`."""
        return cls(is_video=False, images=tuple(images), n_original=len(images), seen_sizes=seen_sizes)

    @classmethod
    def for_video(
        cls, frames: Sequence[Image.Image], seen_sizes: Sequence[tuple[int, int]] | None = None
    ) -> "VisualState":
        """State of a video query given its (pre-extracted) frames."""
        return cls(is_video=True, video_frames=tuple(frames), seen_sizes=seen_sizes)

    @property
    def n_returned(self) -> int:
        """How many images the operations have returned so far."""
        return len(self.images) - self.n_original


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """Outcome of one call: the observation text for the next user turn and the images to append.

    Attributes:
      ok: the operation ran.
      text: the full observation text (success text, or the error template filled with `error`).
      new_images: images to show after `text` (empty on error).
      error: the error message, None on success.
      name: the tool name as the model called it (None when no name could be read).
      origins: where each of `new_images` comes from (see Origin), in order; () when unknown.
      ignored_keys: keys of the call that no tool reads (extra top-level keys, then extra arguments), which
        the original ignored as well; counted in the trajectory.
    """

    ok: bool
    text: str
    new_images: list[Image.Image]
    error: str | None
    name: str | None
    origins: tuple[Origin | None, ...] = ()
    ignored_keys: tuple[str, ...] = ()


def error_result(message: str, name: str | None, cfg: OpsConfig | None = None) -> ToolResult:
    """A failed call with the observation `\\nExecution error:\\n{message}\\n` (or cfg's template)."""
    templates = cfg.templates if cfg is not None else PromptTemplates()
    return ToolResult(False, templates.error.format(message=message), [], message, name)


def show(value: Any) -> str:
    """A bounded repr of a model-provided value for error messages (never raises on odd values)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints beyond the digit limit, very deep nesting
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "...(truncated)"


def _as_index(value: Any) -> int | None:
    """An integer index from a JSON number: ints, or floats with an integral value (1.0 -> 1); else None."""
    if isinstance(value, bool):  # JSON true/false are Python bools, which are ints
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _as_coord(value: Any) -> float | None:
    """A finite float from a JSON number, or None (bools, strings, NaN, inf, ints too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


def _pick_crop_source(
    state: VisualState, t: int, name: str, video_crop_index: str = "original"
) -> tuple[Image.Image, tuple[int, int], Origin | None, None] | tuple[None, None, None, str]:
    """(image to crop, size its absolute coordinates refer to, its origin, None) or (None, None, None, error)."""
    prefix = f"Execution Error: Incorrect `target_image` argument in `{name}` operation."
    if state.is_video and state.n_returned == 0:
        frames = state.video_frames
        if not 1 <= t <= len(frames):
            return (
                None,
                None,
                None,
                f"{prefix} You can only pick an image **from** the video within [1,{len(frames)}], but the "
                f"current argument `target_image={show(t)}`.",
            )
        seen = state.seen_sizes[t - 1] if state.seen_sizes is not None else frames[t - 1].size
        return frames[t - 1], seen, (t - 1, FULL_BOX), None
    if state.is_video:
        n = state.n_returned
        # "original": the list [[video], returned...] is indexed by t - 1, and t - 1 >= 1 is asserted.
        first = 2 if video_crop_index == "original" else 1
        if t < first:
            return (
                None,
                None,
                None,
                f"{prefix} You can only pick an image within range [{first},{n + first - 1}], but the current "
                f"argument `target_image={show(t)}`.",
            )
        if t > n + first - 1:
            # The original had no upper check: Python's IndexError text became the observation.
            message = (
                "list index out of range"
                if video_crop_index == "original"
                else f"{prefix} You can only pick an image within range [1,{n}], but the current argument "
                f"`target_image={show(t)}`."
            )
            return None, None, None, message
        k = t - first
        image = state.images[k]
        return image, image.size, state.origins[k], None
    n = len(state.images)
    if not 1 <= t <= n:  # the original let 0 and negatives wrap around to the last images
        return None, None, None, f"{prefix} You can only pick an image within [1,{n}]"
    image = state.images[t - 1]
    if t <= state.n_original and state.seen_sizes is not None:
        return image, state.seen_sizes[t - 1], state.origins[t - 1], None
    return image, image.size, state.origins[t - 1], None


def compose_box(outer: tuple[float, ...], inner: tuple[float, ...]) -> tuple[float, float, float, float]:
    """The normalised box `inner` (relative to the image `outer` cut out) in the coordinates `outer` is in.

    A crop is resized as a whole, so fractions of the crop map linearly onto its box.
    """
    ox1, oy1, ox2, oy2 = outer
    w, h = ox2 - ox1, oy2 - oy1
    ix1, iy1, ix2, iy2 = inner
    return (ox1 + ix1 * w, oy1 + iy1 * h, ox1 + ix2 * w, oy1 + iy2 * h)


def crop_box(
    bbox: tuple[float, float, float, float],
    image_size: tuple[int, int],
    seen_size: tuple[int, int] | None = None,
    padding: str = "capped",
) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom) that crop_image cuts from an image for a checked bbox.

    Args:
      bbox: finite [x1, y1, x2, y2] with x1 < x2, y1 < y2; fractions when all four are < 1, else pixels
        of an image of `seen_size`.
      image_size: (width, height) of the image that is cut.
      seen_size: (width, height) that pixel coordinates refer to; None = image_size.
      padding: "capped" (min(0.1, 600/side), int-truncated) or "fixed" (0.1, rounded).
    """
    x1, y1, x2, y2 = bbox
    img_w, img_h = image_size
    seen_w, seen_h = seen_size or image_size
    if not all(c < 1 for c in bbox):  # the original's rule: any value >= 1 means pixel coordinates
        x1, x2 = x1 / seen_w, x2 / seen_w
        y1, y2 = y1 / seen_h, y2 / seen_h
    if padding == "capped":
        pad_x, pad_y = min(0.1, 600.0 / img_w), min(0.1, 600.0 / img_h)
    else:
        pad_x = pad_y = 0.1
    x1, x2 = (min(max(v, 0.0), 1.0) for v in (x1 - pad_x, x2 + pad_x))
    y1, y2 = (min(max(v, 0.0), 1.0) for v in (y1 - pad_y, y2 + pad_y))
    to_px = int if padding == "capped" else round
    return to_px(x1 * img_w), to_px(y1 * img_h), to_px(x2 * img_w), to_px(y2 * img_h)


def crop_image(
    state: VisualState,
    bbox_2d: Any,
    target_image: Any,
    cfg: OpsConfig | None = None,
    name: str = "crop_image",
) -> ToolResult:
    """Crops a region of one image of the conversation and resizes it for the model.

    Args:
      state: the conversation's images.
      bbox_2d: [x1, y1, x2, y2]; fractions of width/height when all four are < 1, else pixels of the
        target image (in its seen size for originals, see VisualState.seen_sizes).
      target_image: 1-based index under the numbering rule of VisualState (1.0 is read as 1).
      cfg: operation settings; None = training defaults.
      name: the tool name as called, used in messages.

    Returns:
      ToolResult with one resized image and "Here is the cropped image (Image Size: WxH):", or an error.
    """
    cfg = cfg or OpsConfig()
    t = _as_index(target_image)
    if t is None:
        return error_result(
            f"Execution Error: `target_image` must be an integer image index (1 for the original image), got "
            f"{show(target_image)}.",
            name,
            cfg,
        )
    image, seen, source, message = _pick_crop_source(state, t, name, cfg.video_crop_index)
    if message is not None:
        return error_result(message, name, cfg)
    coords = (
        [_as_coord(v) for v in bbox_2d] if isinstance(bbox_2d, list | tuple) and len(bbox_2d) == 4 else None
    )
    if coords is None or any(c is None for c in coords):
        return error_result(
            f"Execution Error: `bbox_2d` must be a list of 4 finite numbers [x1, y1, x2, y2], got {show(bbox_2d)}.",
            name,
            cfg,
        )
    x1, y1, x2, y2 = coords
    if not (x1 < x2 and y1 < y2):
        return error_result(
            f"Execution Error: Invalid `bbox_2d={show(bbox_2d)}`: expected x1 < x2 and y1 < y2 for "
            "[x1, y1, x2, y2].",
            name,
            cfg,
        )
    box = crop_box((x1, y1, x2, y2), image.size, seen, cfg.padding)
    w, h = box[2] - box[0], box[3] - box[1]
    if not (w > cfg.min_crop_side and h > cfg.min_crop_side):
        return error_result(f"Cropped image is too small: {w}x{h}", name, cfg)
    try:
        out = resize_to_limits(image.crop(box), cfg.crop_min_pixels, cfg.crop_max_pixels)
    except ValueError as e:  # smart_resize refuses aspect ratios above 200
        return error_result(f"Execution Error: The cropped region {w}x{h} cannot be shown: {e}", name, cfg)
    text = cfg.templates.crop_ok.format(width=out.width, height=out.height)
    iw, ih = image.size
    origin = None
    if source is not None:
        origin = (source[0], compose_box(source[1], (box[0] / iw, box[1] / ih, box[2] / iw, box[3] / ih)))
    return ToolResult(True, text, [out], None, name, origins=(origin,))


def select_frames(
    state: VisualState, target_frames: Any, cfg: OpsConfig | None = None, name: str = "select_frames"
) -> ToolResult:
    """Returns chosen frames of the video as new images, numbered after the images returned so far.

    Args:
      state: the conversation's images; must be a video query.
      target_frames: list of 1-based frame indices (integral floats accepted), distinct, at most
        cfg.max_frames; 0 and negatives are rejected (the original wrapped them around).
      cfg: operation settings; None = training defaults.
      name: the tool name as called.

    Returns:
      ToolResult with one image per frame, in the requested order, and
      "Here are the selected frames (Frame Size: WxH, Numbered a to b):", or an error.
    """
    cfg = cfg or OpsConfig()
    if not state.is_video:
        return error_result(
            "Execution Error: You attempted to `select_frames` from **image** not **video**. You should use "
            f"`{cfg.crop_tool_name}` instead for inspecting **image**.",
            name,
            cfg,
        )
    if not isinstance(target_frames, list | tuple):
        return error_result(
            f"Execution Error: `target_frames` must be a list of frame indices, got {show(target_frames)}.",
            name,
            cfg,
        )
    indices = [_as_index(v) for v in target_frames]
    if not indices or any(i is None for i in indices):
        return error_result(
            "Execution Error: `target_frames` must be a non-empty list of integer frame indices, got "
            f"{show(target_frames)}.",
            name,
            cfg,
        )
    if len(indices) > cfg.max_frames:
        return error_result(
            f"Execution Error: You have selected {len(indices)} frames in total. Think again which frames you need "
            f"to check in details (no more than {cfg.max_frames} frames)",
            name,
            cfg,
        )
    n_frames = len(state.video_frames)
    if any(not 1 <= i <= n_frames for i in indices):
        return error_result(
            f"Execution Error: There are {n_frames} frames numbered in range [1,{n_frames}]. Your selection "
            f"`target_frames={show(list(target_frames))}` is out of range.",
            name,
            cfg,
        )
    if len(set(indices)) != len(indices):
        return error_result(
            f"Execution Error: Your selection `target_frames={show(list(target_frames))}` repeats a frame. Select "
            "each frame at most once.",
            name,
            cfg,
        )
    frames = [state.video_frames[i - 1] for i in indices]
    if cfg.select_min_pixels is None:
        out = [to_rgb(f) for f in frames]
    else:
        try:
            out = [resize_to_limits(f, cfg.select_min_pixels, cfg.select_max_pixels) for f in frames]
        except ValueError as e:  # a frame with an aspect ratio above 200
            return error_result(f"Execution Error: The selected frames cannot be shown: {e}", name, cfg)
    start = state.n_returned + 1
    text = cfg.templates.select_ok.format(
        width=out[0].width, height=out[0].height, start=start, end=start + len(out) - 1
    )
    return ToolResult(True, text, out, None, name, origins=tuple((i - 1, FULL_BOX) for i in indices))


def apply_result(state: VisualState, result: ToolResult) -> VisualState:
    """The state after `result`: its images appended (a new state; a failed call returns `state`)."""
    if not result.ok or not result.new_images:
        return state
    selected = len(result.new_images) if result.name == "select_frames" else 0
    origins = (
        result.origins if len(result.origins) == len(result.new_images) else (None,) * len(result.new_images)
    )
    return dataclasses.replace(
        state,
        images=state.images + tuple(result.new_images),
        n_selected=state.n_selected + selected,
        origins=state.origins + tuple(origins),
    )
