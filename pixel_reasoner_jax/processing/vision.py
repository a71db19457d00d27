"""Host-side image and video preprocessing for Qwen2.5-VL: smart_resize, resize, normalise, patchify.

Mirrors transformers' Qwen2VLImageProcessor (PIL backend) and qwen-vl-utils' resize rule.
"""

import math

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


def resize_to_limits(img: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """RGB image resized (PIL bicubic) to its smart_resize size within [min_pixels, max_pixels]."""
    img = to_rgb(img)
    h, w = smart_resize(img.height, img.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (h, w) == (img.height, img.width):
        return img
    return img.resize((w, h), resample=Image.BICUBIC)
