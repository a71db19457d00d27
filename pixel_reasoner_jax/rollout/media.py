"""Media on the SGLang HTTP path, client side: images -> PNG bytes / data URLs, and pad-token counts.

The client encodes already-resized images as lossless PNG (serve/media.py decodes them); client and server
count the tokens each `<|image_pad|>` / `<|video_pad|>` expands to from the same rule, here.
"""

import base64
import io
import math
from collections.abc import Sequence

from PIL import Image

from pixel_reasoner_jax.processing.vision import FACTOR, to_rgb
from pixel_reasoner_jax.rollout.policy import Video

PNG_MIME = "image/png"


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
