"""Host-side image and video preprocessing for Qwen2.5-VL: loading, smart_resize, normalise, patchify.

Mirrors transformers' Qwen2VLImageProcessor (PIL backend); owns preprocessor_config.json read and write.
"""

import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # 28: every side is a multiple of one merged patch
MAX_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int = FACTOR, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Returns (h, w), multiples of `factor`, with h*w in [min_pixels, max_pixels] and the aspect kept.

    Raises:
      ValueError: a side is not positive or the aspect ratio exceeds 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}"
        )
    # Python's round() is banker's rounding, as in the reference implementation.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels are composited on white (qwen-vl-utils), not on black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_to_limits(img: Image.Image, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> Image.Image:
    """RGB image resized (PIL bicubic) to its smart_resize size within [min_pixels, max_pixels]."""
    img = to_rgb(img)
    h, w = smart_resize(img.height, img.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), resample=Image.BICUBIC)


@dataclasses.dataclass(frozen=True)
class Video:
    """A video item: its frames (PIL, one size) and the sampled frame rate."""

    frames: tuple[Image.Image, ...]
    fps: float = 2.0


def resize_video_frames(
    frames: Sequence[Image.Image], min_pixels: int, max_pixels: int, factor: int = FACTOR
) -> tuple[Image.Image, ...]:
    """All frames resized (PIL bicubic, RGB) to frame 0's smart_resize size, so the video has one size.

    Raises:
      ValueError: no frames.
    """
    if not frames:
        raise ValueError("a video needs at least one frame, got none")
    h, w = smart_resize(frames[0].height, frames[0].width, factor, min_pixels, max_pixels)
    out = []
    for f in frames:
        f = to_rgb(f)
        out.append(f if f.size == (w, h) else f.resize((w, h), resample=Image.BICUBIC))
    return tuple(out)


# ------------------------------------------------------------------ processor config

# OpenAI CLIP statistics, used by every Qwen2-VL / Qwen2.5-VL checkpoint.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_MIN_PIXELS = 56 * 56  # 3136, the Hub preprocessor_config.json value
HUB_MAX_PIXELS = 16384 * 28 * 28  # 12,845,056, the Hub value (16384 visual tokens)
PREPROCESSOR_FILE = "preprocessor_config.json"


class BadImageError(ValueError):
    """An image that cannot be decoded, or is too small for one merged patch."""


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """What preprocessor_config.json says about resizing, normalising and patchifying images.

    Attributes:
      min_pixels, max_pixels: bounds on the resized area (smart_resize).
      patch_size: spatial patch side in pixels (14).
      temporal_patch_size: frames per temporal patch (2); an image is duplicated to fill it.
      merge_size: side of the patch block merged into one LLM token (2).
      image_mean, image_std: per-channel normalisation after the 1/255 rescale.
    """

    min_pixels: int = HUB_MIN_PIXELS
    max_pixels: int = HUB_MAX_PIXELS
    patch_size: int = PATCH
    temporal_patch_size: int = 2
    merge_size: int = MERGE
    image_mean: tuple[float, float, float] = IMAGE_MEAN
    image_std: tuple[float, float, float] = IMAGE_STD

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels}, max_pixels={self.max_pixels}"
            )
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)}")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")

    @property
    def factor(self) -> int:
        """Side of one merged patch in pixels (28): resized sides are multiples of it."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: 3 channels x temporal x patch x patch (1176)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "preprocessor config") -> "ImageProcessorConfig":
        """Reads the Hub layout (`min_pixels` / `max_pixels`) or transformers 5's `size` dict.

        The flat keys win when both exist, as in transformers' Qwen2VLImageProcessor.

        Raises:
          ValueError: a pixel bound is missing, or a preprocessing switch asks for something unsupported.
        """
        size = d.get("size") or {}
        min_pixels = d.get("min_pixels", size.get("shortest_edge"))
        max_pixels = d.get("max_pixels", size.get("longest_edge"))
        if min_pixels is None or max_pixels is None:
            raise ValueError(
                f"{source} must give min_pixels/max_pixels or size.shortest_edge/size.longest_edge, got {dict(d)}"
            )
        # Only the standard pipeline is implemented; a config that turns a step off must not pass silently.
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag, True) is not True:
                raise ValueError(
                    f"{source} sets {flag}={d[flag]!r}; only the standard pipeline (true) is supported"
                )
        rescale = d.get("rescale_factor", 1 / 255)
        if not math.isclose(rescale, 1 / 255, rel_tol=1e-6):
            raise ValueError(f"{source} has rescale_factor={rescale}; expected 1/255")
        return cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(d.get("patch_size", PATCH)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            merge_size=int(d.get("merge_size", MERGE)),
            image_mean=tuple(float(x) for x in d.get("image_mean", IMAGE_MEAN)),
            image_std=tuple(float(x) for x in d.get("image_std", IMAGE_STD)),
        )

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike) -> "ImageProcessorConfig":
        """Reads preprocessor_config.json from a checkpoint folder.

        Raises:
          FileNotFoundError: the folder has no preprocessor_config.json.
          ValueError: the file is not valid JSON or lacks the pixel bounds.
        """
        path = Path(ckpt_dir) / PREPROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {PREPROCESSOR_FILE} in checkpoint folder {os.fspath(ckpt_dir)!r}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """preprocessor_config.json as the Qwen2.5-VL Hub repos ship it."""
        return {
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
        }


def write_processor_files(
    out_dir: str | os.PathLike, min_pixels: int = HUB_MIN_PIXELS, max_pixels: int = HUB_MAX_PIXELS
) -> Path:
    """Writes preprocessor_config.json (Hub layout) into `out_dir`; returns the file path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PREPROCESSOR_FILE
    cfg = ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    path.write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    return path


# ------------------------------------------------------------------ loading


def _describe(src: Any) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes of image data>"
    return repr(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else repr(src)


def load_image(src: "str | os.PathLike | bytes | Image.Image") -> Image.Image:
    """Decodes an image (path, encoded bytes, or a PIL image) to RGB, transparency on white.

    Raises:
      BadImageError: undecodable data, or a side under 28 px (smaller than one merged patch).
      FileNotFoundError: a path that does not exist.
    """
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(src)))
            img.load()  # decode now: a truncated file must fail here, not later inside a resize
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImageError(f"cannot decode image {_describe(src)}: {e}") from e
    elif isinstance(src, (str, os.PathLike)):
        if not os.path.isfile(src):
            raise FileNotFoundError(f"no image file {_describe(src)}")
        try:
            with Image.open(src) as opened:
                opened.load()
                img = opened.copy()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImageError(f"cannot decode image {_describe(src)}: {e}") from e
    else:
        raise TypeError(f"load_image expects a path, bytes or a PIL image, got {type(src).__name__}")
    if min(img.size) < FACTOR:
        raise BadImageError(
            f"image {_describe(src)} is {img.width}x{img.height}; each side must be at least {FACTOR} px"
        )
    return to_rgb(img)


# ------------------------------------------------------------------ pixels and patches


def normalize(img: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """(3, H, W) float32: uint8 RGB x 1/255 (in float64, as transformers does), minus mean, over std."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def patchify(frames: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Flattens normalised frames (T, C, H, W) into pixel_values rows in merge-block-major order.

    T must divide by temporal_patch_size; consecutive frames form one temporal patch. Rows run over
    (t, block row, block col, row in block, col in block); columns over (channel, frame in patch, py, px),
    the layout the vision tower's Conv3d patch embedding expects (reference/qwen25vl.md §5.2, §5.3).

    Returns:
      pixel_values (gt*gh*gw, C*tp*p*p) float32 and grid_thw (3,) int64.
    """
    t, c, h, w = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if t % tp or h % (p * m) or w % (p * m):
        raise ValueError(
            f"frames of shape {frames.shape} do not tile: need T % {tp} == 0 and H, W multiples of {p * m}"
        )
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # (gt, tp, c, bh, ih, py, bw, iw, px) -> (gt, bh, bw, ih, iw, c, tp, py, px)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32)
    return pixel_values, np.array([gt, gh, gw], dtype=np.int64)


def preprocess_image(
    img: Image.Image, cfg: ImageProcessorConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (pixel_values (P, 1176) float32, grid_thw (3,) int64), as transformers' PIL backend.

    The image is resized (bicubic) to its smart_resize size, rescaled, normalised, and its single frame
    duplicated along the temporal axis.
    """
    cfg = cfg or ImageProcessorConfig()
    resized = resize_to_limits(img, cfg.min_pixels, cfg.max_pixels, factor=cfg.factor)
    x = normalize(resized, cfg)
    frames = np.broadcast_to(x[None], (cfg.temporal_patch_size, *x.shape))
    return patchify(frames, cfg)


def preprocess_video(
    frames: "Sequence[Image.Image] | np.ndarray", cfg: ImageProcessorConfig | None, fps: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Frames sampled at `fps` -> (pixel_values, grid_thw (3,), second_per_grid).

    All frames get the smart_resize size of the first (they must share one size); an odd count repeats the
    last frame; consecutive pairs form a temporal patch; second_per_grid = temporal_patch_size / fps feeds
    the M-RoPE temporal positions. Resizing is PIL bicubic; transformers' video processor uses torchvision
    (antialiased bicubic), which can differ by a few grey levels.

    Args:
      frames: PIL images, or a uint8 array (T, H, W, 3).
      cfg: pixel bounds per frame and patch sizes; None means ImageProcessorConfig().
      fps: frames per second of the sampled frames (> 0).

    Raises:
      ValueError: no frames, frames of different sizes, or fps <= 0.
    """
    cfg = cfg or ImageProcessorConfig()
    if not fps or fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"video array must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        frames = [Image.fromarray(f) for f in frames]
    frames = list(frames)
    if not frames:
        raise ValueError("preprocess_video needs at least one frame, got none")
    w0, h0 = frames[0].size
    for i, f in enumerate(frames):
        if f.size != (w0, h0):
            raise ValueError(f"video frame {i} is {f.width}x{f.height}; frame 0 is {w0}x{h0}; all must match")
    h, w = smart_resize(h0, w0, factor=cfg.factor, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    arrays = []
    for f in frames:
        f = to_rgb(f)
        if (f.height, f.width) != (h, w):
            f = f.resize((w, h), resample=Image.BICUBIC)
        arrays.append(normalize(f, cfg))
    while len(arrays) % cfg.temporal_patch_size:
        arrays.append(arrays[-1])
    pixel_values, grid = patchify(np.stack(arrays), cfg)
    return pixel_values, grid, cfg.temporal_patch_size / float(fps)


def num_image_tokens(grid_thw: "Sequence[int] | np.ndarray", merge_size: int = MERGE) -> int:
    """LLM placeholder tokens for one image or video: t * h * w / merge_size**2.

    Raises:
      ValueError: grid is not three positive ints with h, w divisible by merge_size.
    """
    g = [int(x) for x in np.asarray(grid_thw).reshape(-1)]
    if len(g) != 3 or min(g) <= 0 or g[1] % merge_size or g[2] % merge_size:
        raise ValueError(f"grid_thw must be 3 positive ints with h, w divisible by {merge_size}, got {g}")
    return g[0] * g[1] * g[2] // (merge_size * merge_size)
