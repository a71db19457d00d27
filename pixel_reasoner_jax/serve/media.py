"""The server's media items: data URLs, bare base64 and (opt-in) local files -> checked, model-sized images.

Size, pixel-count and format limits apply before pixels are decoded; images are then resized as SGLang does.
Encoding for the client and the pad-token counts both sides share stay in rollout/media.py.
"""

import base64
import binascii
import io
import math
import os
from collections.abc import Sequence

from PIL import Image

from pixel_reasoner_jax.processing.vision import ImageProcessorConfig, resize_to_limits, smart_resize, to_rgb

# What SGLang's loader accepts as a local image path (0.5.2 utils.load_image), and the formats we decode.
LOCAL_PATH_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
DEFAULT_MAX_BYTES = 64 << 20  # one encoded image
DEFAULT_MAX_PIXELS = 64 << 20  # decoded area; far above any Qwen2.5-VL input, well below a decompression bomb


class MediaError(ValueError):
    """An image_data / video_data item that cannot be used: wrong form, undecodable, too big, wrong format."""


def _show(item: str, limit: int = 48) -> str:
    """A short repr of a possibly huge string for error messages."""
    return repr(item) if len(item) <= limit else repr(item[:limit]) + f"... ({len(item)} chars)"


def _b64decode(text: str, where: str) -> bytes:
    # Strict alphabet check: a lenient decode would turn a path or a typo into garbage bytes.
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{where}: invalid base64 ({e}) in {_show(text)}") from e


def _open_checked(data: bytes, where: str, max_pixels: int, formats: Sequence[str]) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{where}: {len(data)} bytes are not a decodable image ({e})") from e
    if img.format not in formats:
        raise MediaError(f"{where}: a {img.format} image; expected one of {', '.join(formats)}")
    w, h = img.size
    # Checked from the header before decoding pixels, so an oversized image costs nothing.
    if w <= 0 or h <= 0 or w * h > max_pixels:
        raise MediaError(f"{where}: image is {w}x{h} = {w * h} pixels; expected 1..{max_pixels} pixels")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{where}: truncated or corrupt {img.format} image ({e})") from e
    return to_rgb(img)


def decode_image_data(
    item: str,
    *,
    allow_local_paths: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] = IMAGE_FORMATS,
    where: str = "image_data item",
) -> Image.Image:
    """Decodes one SGLang `image_data` item to an RGB PIL image.

    Accepted: a data URL (`data:image/<fmt>;base64,...`), bare base64, and, only with allow_local_paths, a
    local file path ending in .png/.jpg/.jpeg/.webp/.gif (`file://` prefix allowed). http(s) URLs are never
    fetched.

    Args:
      item: the string from the request.
      allow_local_paths: read local files (off by default: a request must not make the server read files).
      max_bytes: limit on the encoded size.
      max_pixels: limit on width * height, checked before decoding.
      formats: PIL format names accepted.
      where: how error messages name the item (e.g. "image_data[0][1]").

    Raises:
      MediaError: any other form, invalid base64, oversize, an unsupported format, or undecodable bytes.
    """
    if not isinstance(item, str):
        raise MediaError(f"{where}: expected a data URL or base64 string, got {type(item).__name__}")
    if not item:
        raise MediaError(f"{where}: empty string; expected a data URL or base64 image")
    if item.startswith("data:"):
        head, sep, payload = item.partition(",")
        if not sep or not head.endswith(";base64"):
            raise MediaError(
                f"{where}: data URL must look like 'data:image/png;base64,...', got {_show(item)}"
            )
        mime = head[len("data:") : -len(";base64")]
        if not mime.startswith("image/"):
            raise MediaError(f"{where}: data URL has media type {mime!r}; expected image/*")
        if len(payload) > math.ceil(max_bytes / 3) * 4 + 64:
            raise MediaError(f"{where}: {len(payload)} base64 chars exceed the {max_bytes}-byte image limit")
        data = _b64decode(payload, where)
    elif item.startswith(("http://", "https://")):
        raise MediaError(f"{where}: URLs are not fetched by this server ({_show(item)}); send a data URL")
    elif item.lower().endswith(LOCAL_PATH_SUFFIXES) or item.startswith("file://"):
        # Base64 has no '.', so a name with an image suffix is unambiguously a path.
        path = item[len("file://") :] if item.startswith("file://") else item
        if not allow_local_paths:
            raise MediaError(
                f"{where}: local image paths are disabled ({_show(path)}); send a data URL, or start the "
                "server with --allow-local-paths"
            )
        if not os.path.isfile(path):
            raise MediaError(f"{where}: no image file {_show(path)}")
        size = os.path.getsize(path)
        if size > max_bytes:
            raise MediaError(f"{where}: file {_show(path)} has {size} bytes; limit {max_bytes}")
        with open(path, "rb") as f:
            data = f.read()
    else:
        if len(item) > math.ceil(max_bytes / 3) * 4 + 64:
            raise MediaError(f"{where}: {len(item)} base64 chars exceed the {max_bytes}-byte image limit")
        data = _b64decode(item, where)
    if len(data) > max_bytes:
        raise MediaError(f"{where}: {len(data)} bytes exceed the {max_bytes}-byte image limit")
    return _open_checked(data, where, max_pixels, formats)


# --------------------------------------------------------------------------------------- model size


def load_image(item: str, where: str, image: ImageProcessorConfig, allow_local_paths: bool) -> Image.Image:
    """One image item decoded (decode_image_data) and resized into `image`'s bounds, multiples of its factor.

    Raises:
      MediaError: the item cannot be decoded, or its size cannot be brought into the bounds.
    """
    try:
        img = decode_image_data(item, allow_local_paths=allow_local_paths, where=where)
        return resize_to_limits(img, image.min_pixels, image.max_pixels, image.factor)
    except MediaError:
        raise
    except ValueError as e:
        raise MediaError(str(e)) from None


def load_frames(
    frames: Sequence[str], where: str, image: ImageProcessorConfig, allow_local_paths: bool
) -> list[Image.Image]:
    """A video's frame items decoded, all resized to the first frame's target size.

    Raises:
      MediaError: a frame cannot be decoded, frames differ in size, or the size cannot be brought into bounds.
    """
    imgs = [
        decode_image_data(f, allow_local_paths=allow_local_paths, where=f"{where}.frames[{i}]")
        for i, f in enumerate(frames)
    ]
    w0, h0 = imgs[0].size
    if any(im.size != (w0, h0) for im in imgs):
        raise MediaError(f"{where}: frames differ in size; all must be {w0}x{h0} like frame 0")
    try:
        h, w = smart_resize(h0, w0, image.factor, image.min_pixels, image.max_pixels)
    except ValueError as e:
        raise MediaError(f"{where}: {e}") from None
    if (w, h) != (w0, h0):
        imgs = [im.resize((w, h), resample=Image.BICUBIC) for im in imgs]
    return imgs
