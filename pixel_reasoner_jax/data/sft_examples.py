"""SFT records as trainer Examples: media loaded and sized as the original's SFT processor, loss mask by rule.

The data side of processing/batch.py: records (data/records.py) in, `processing.batch.Example` out.
"""

from collections.abc import Mapping

from PIL import Image

from pixel_reasoner_jax.data.records import SFTRecord, assistant_turn_mask, load_image, load_video_frames
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.processing.batch import Example, encode_messages
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import (
    ImageProcessorConfig,
    Video,
    resize_to_limits,
    resize_video_frames,
)
from pixel_reasoner_jax.tools.ops import PIX

__all__ = ["SFT_VIDEO_MAX_PIXELS", "SFT_VIDEO_MIN_PIXELS", "sft_example"]

# SFT video frames (reference §5): the SFT code caps each frame at 420*360 px; qwen_vl_utils' video floor.
SFT_VIDEO_MIN_PIXELS = 128 * PIX
SFT_VIDEO_MAX_PIXELS = 420 * 360


def sft_example(
    record: SFTRecord,
    tok: QwenTokenizer,
    proc_cfg: ImageProcessorConfig,
    model_cfg: ModelConfig,
    *,
    mask_mode: str = "final_turns",
    video_min_pixels: int = SFT_VIDEO_MIN_PIXELS,
    video_max_pixels: int = SFT_VIDEO_MAX_PIXELS,
    video_fps: float = 2.0,
    num_video_frames: int = 16,
) -> Example:
    """Example of an SFT trajectory; loss mask from data.records.assistant_turn_mask(messages, mask_mode).

    Images are resized into the processor's limits; a video item (a list of frame paths, all used, or a
    video file / frame folder sampled to `num_video_frames`) is resized into the video limits at `video_fps`.
    """
    try:
        media = _sft_media(record, proc_cfg, video_min_pixels, video_max_pixels, video_fps, num_video_frames)
        turn_mask = assistant_turn_mask(record.messages, mask_mode)
    except (ValueError, OSError) as e:  # unreadable media, a bad mode: name the sample
        raise ValueError(f"sample {record.qid!r}: {e}") from e
    loss = [m for m, msg in zip(turn_mask, record.messages) if msg.get("role") == "assistant"]
    return encode_messages(
        tok, record.messages, media, proc_cfg, model_cfg, assistant_loss=loss, qid=record.qid
    )


def _sft_media(
    record: SFTRecord, proc_cfg, video_min_pixels, video_max_pixels, video_fps, num_video_frames
) -> list[Image.Image | Video]:
    """The record's vision items in order, at their final sizes."""
    media: list[Image.Image | Video] = []
    for msg in record.messages:
        content = msg.get("content")
        for item in content if isinstance(content, list) else ():
            # SFTRecord content items are normalised: each has "type" text, image or video.
            kind = item.get("type") if isinstance(item, Mapping) else "text"
            if kind == chat.IMAGE:
                img = load_image(item["image"])
                media.append(resize_to_limits(img, proc_cfg.min_pixels, proc_cfg.max_pixels, proc_cfg.factor))
            elif kind == chat.VIDEO:
                src = item["video"]
                frames = (
                    [load_image(p) for p in src]
                    if isinstance(src, list)
                    else load_video_frames(src, num_video_frames)
                )
                frames = resize_video_frames(frames, video_min_pixels, video_max_pixels, proc_cfg.factor)
                media.append(Video(frames=frames, fps=video_fps))
    return media
