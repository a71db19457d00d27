"""Media on the SGLang HTTP path: images <-> PNG bytes / base64 / data URLs, and pad-token counts.

The client encodes already-resized images as lossless PNG; the server decodes and validates them; both count
the tokens each `<|image_pad|>` / `<|video_pad|>` expands to from the same rule.
"""

import base64
import binascii
import io
import math
import os
from collections.abc import Sequence

from PIL import Image

from pixel_reasoner_jax.processing.vision import FACTOR, to_rgb
from pixel_reasoner_jax.rollout.policy import Video

# What SGLang's loader accepts as a local image path (0.5.2 utils.load_image), and the formats we decode.
LOCAL_PATH_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
DEFAULT_MAX_BYTES = 64 << 20  # one encoded image
DEFAULT_MAX_PIXELS = 64 << 20  # decoded area; far above any Qwen2.5-VL input, well below a decompression bomb
PNG_MIME = "image/png"


class MediaError(ValueError):
    """An image_data / video_data item that cannot be used: wrong form, undecodable, too big, wrong format."""


def _show(item: str, limit: int = 48) -> str:
    """A short repr of a possibly huge string for error messages."""
    return repr(item) if len(item) <= limit else repr(item[:limit]) + f"... ({len(item)} chars)"


def image_to_png_bytes(img: Image.Image, compress_level: int = 1) -> bytes:
    """Lossless PNG bytes of the RGB image (transparency composited on white, as the trainer loads it).

    Args:
      img: a PIL image, already resized to its final size by the caller.
      compress_level: zlib level 0-9; PNG stays lossless at every level, 1 is the fastest useful one.

    Raises:
      TypeError: img is not a PIL image.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"image_to_png_bytes expects a PIL image, got {type(img).__name__}")
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def png_data_url(img: Image.Image, compress_level: int = 1) -> str:
    """`data:image/png;base64,...` of the image (see image_to_png_bytes)."""
    b64 = base64.b64encode(image_to_png_bytes(img, compress_level)).decode("ascii")
    return f"data:{PNG_MIME};base64,{b64}"


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


# ------------------------------------------------------------------------------------ token counts


def image_pad_count(width: int, height: int, factor: int = FACTOR) -> int:
    """LLM tokens of one image of this (final) size: (H / 28) * (W / 28).

    Raises:
      ValueError: a side is not a positive multiple of `factor` (the image was not resized first).
    """
    if width <= 0 or height <= 0 or width % factor or height % factor:
        raise ValueError(
            f"image is {width}x{height}; both sides must be positive multiples of {factor} "
            "(resize with processing.vision.resize_to_limits before sending)"
        )
    return (height // factor) * (width // factor)


def video_pad_count(num_frames: int, width: int, height: int, factor: int = FACTOR, temporal: int = 2) -> int:
    """LLM tokens of a video: ceil(T / temporal) temporal patches of (H / 28) * (W / 28) tokens.

    An odd frame count is padded by repeating the last frame, hence the ceiling.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    return math.ceil(num_frames / temporal) * image_pad_count(width, height, factor)


def media_pad_count(item: "Image.Image | Video", factor: int = FACTOR, temporal: int = 2) -> int:
    """Tokens one media item's single pad expands to (images and videos at their final size).

    Raises:
      ValueError: a side is not a multiple of `factor`, or a video's frames differ in size.
      TypeError: item is neither a PIL image nor a Video.
    """
    if isinstance(item, Image.Image):
        return image_pad_count(item.width, item.height, factor)
    if isinstance(item, Video):
        if not item.frames:
            raise ValueError("a video needs at least one frame, got none")
        w, h = item.frames[0].size
        for i, f in enumerate(item.frames):
            if f.size != (w, h):
                raise ValueError(
                    f"video frame {i} is {f.width}x{f.height}; frame 0 is {w}x{h}; all must match"
                )
        return video_pad_count(len(item.frames), w, h, factor, temporal)
    raise TypeError(f"media items must be PIL images or Video, got {type(item).__name__}")


def expanded_length(
    num_ids: int, media: Sequence["Image.Image | Video"], factor: int = FACTOR, temporal: int = 2
) -> int:
    """Prompt length after each single pad is expanded: len(ids) + sum(tokens - 1) over the media."""
    return num_ids + sum(media_pad_count(m, factor, temporal) - 1 for m in media)


def expand_pads(
    ids: Sequence[int],
    media: Sequence["Image.Image | Video"],
    pad_ids: Sequence[int],
    factor: int = FACTOR,
    temporal: int = 2,
) -> list[int]:
    """The prompt with each single media pad (an id in `pad_ids`) repeated to its token count, media in order.

    What a server's expanded prompt should hold (SGLang's `return_prompt_token_ids`).
    """
    out, k = [], 0
    for t in ids:
        if t in pad_ids:
            if k >= len(media):
                raise ValueError(f"prompt holds more media pads than the {len(media)} media items")
            out += [t] * media_pad_count(media[k], factor, temporal)
            k += 1
        else:
            out.append(t)
    if k != len(media):
        raise ValueError(f"prompt holds {k} media pads but {len(media)} media items were given")
    return out
