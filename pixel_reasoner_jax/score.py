"""CLI: the log-probability of every token of conversations under a checkpoint (the framework-comparison primitive).

Owns the JSONL in/out protocol (one conversation per line, one result or {"error"} per line), media loading
relative to the input file, and the batched, bucketed, jitted scoring of rendered conversations.

    python -m pixel_reasoner_jax.score --checkpoint DIR --input convs.jsonl --output out.jsonl
"""

import argparse
import base64
import binascii
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pixel_reasoner_jax.data.records import resolve_path
from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.processing.batch import Example, collate, encode_messages
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig, load_image, resize_to_limits
from pixel_reasoner_jax.rollout.episode import resize_video_frames
from pixel_reasoner_jax.rollout.policy import Video

# qwen-vl-utils' frame rate when a video item names none.
DEFAULT_VIDEO_FPS = 2.0
# Lines read ahead and sorted by length before batching: less padding, a few compiled shapes only.
WINDOW_BATCHES = 8


class BadLine(ValueError):
    """A conversation line that cannot be scored; the run writes {"error": ...} for it and goes on."""


# ------------------------------------------------------------------------------------------ media


def _image_source(item: Mapping[str, Any], base: str) -> "str | bytes":
    """Path (resolved against `base`) or decoded bytes of an image item; Qwen and OpenAI forms."""
    src = item.get("image")
    if src is None and "image_url" in item:
        url = item["image_url"]
        src = url.get("url") if isinstance(url, Mapping) else url
    if not isinstance(src, str) or not src:
        raise BadLine(f"image item {dict(item)!r} has no image path (expected 'image': PATH)")
    if src.startswith("data:"):
        _, _, payload = src.partition(",")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadLine(f"image data URL is not valid base64: {e}") from e
    if "://" in src and not src.startswith("file://"):
        # Scoring must not reach the network: remote URLs are refused, not fetched.
        raise BadLine(f"image {src[:80]!r} is a remote URL; give a local path or a data: URL")
    return resolve_path(src.removeprefix("file://"), base)


def _video(item: Mapping[str, Any], base: str, proc: ImageProcessorConfig) -> Video:
    frames = item.get("video")
    if not isinstance(frames, list) or not frames or not all(isinstance(p, str) and p for p in frames):
        raise BadLine(f"video item must hold a non-empty list of frame paths, got {frames!r:.80}")
    fps = item.get("fps", DEFAULT_VIDEO_FPS)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
        raise BadLine(f"video item fps must be a positive number, got {fps!r}")
    images = [load_image(resolve_path(p, base)) for p in frames]
    return Video(
        frames=resize_video_frames(images, proc.min_pixels, proc.max_pixels, proc.factor), fps=float(fps)
    )


def load_media(
    messages: Sequence[Mapping[str, Any]], base: str, proc: ImageProcessorConfig
) -> list[Image.Image | Video]:
    """Every image / video item of `messages` in template order, resized into the processor's limits.

    Items are classified as the chat template does (chat.encode_conversation); an item without a source
    is an error here, so a line never scores with fewer media than it names.
    """
    media: list[Image.Image | Video] = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(content, list):
            continue
        for j, item in enumerate(content):
            try:
                kind = chat._item_kind(item, f"message {i} item {j}")
                if kind == chat.IMAGE:
                    img = load_image(_image_source(item, base))
                    media.append(resize_to_limits(img, proc.min_pixels, proc.max_pixels, proc.factor))
                elif kind == chat.VIDEO:
                    media.append(_video(item, base, proc))
            except (ValueError, OSError) as e:
                raise BadLine(f"message {i} item {j}: {e}") from e
    return media


def parse_line(
    text: str, base: str, tok: QwenTokenizer, proc: ImageProcessorConfig, model_cfg, qid: str = ""
) -> Example:
    """One JSONL line {"messages": [...]} -> an expanded Example (ids, pixels, M-RoPE positions).

    Raises:
      BadLine: malformed JSON or messages, unreadable media, media and items that do not match.
    """
    if not text.strip():
        raise BadLine("empty line (expected a JSON object with 'messages')")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"not valid JSON: {e}") from e
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise BadLine(f"expected an object with a non-empty 'messages' list, got {text.strip()[:80]!r}")
    messages = row["messages"]
    if not all(isinstance(m, dict) for m in messages):
        raise BadLine("every message must be an object with 'role' and 'content'")
    media = load_media(messages, base, proc)
    try:
        return encode_messages(tok, messages, media, proc, model_cfg, qid=qid)
    except (ValueError, KeyError, TypeError) as e:
        raise BadLine(str(e)) from e


# ------------------------------------------------------------------------------------------ scoring


def _filler(patch_dim: int, pad_id: int) -> Example:
    """A one-token example that pads a short last batch to the batch size (one compiled shape)."""
    return Example(
        input_ids=np.array([pad_id], np.int32),
        loss_mask=np.zeros(1, np.int8),
        logprobs=np.zeros(1, np.float32),
        positions=np.zeros((3, 1), np.int32),
        pixel_values=np.zeros((0, patch_dim), np.float32),
        grid_thw=np.zeros((0, 3), np.int64),
        is_video=np.zeros(0, bool),
        second_per_grid_ts=np.zeros(0, np.float32),
        vision_spans=np.zeros((0, 2), np.int64),
        qid="filler",
    )


class Scorer:
    """A checkpoint loaded once and a jitted (ids, pixels) -> log p(token | prefix) function.

    Weights are jit arguments and every batch is padded to power-of-two sequence / patch / window
    buckets, so a long file compiles a handful of shapes.
    """

    def __init__(self, ckpt_dir: str, *, batch_size: int = 4, chunk: int = 256, dtype: str = "float32"):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from pixel_reasoner_jax.models import hf_io
        from pixel_reasoner_jax.models.config import ModelConfig
        from pixel_reasoner_jax.models.qwen25vl import token_logprobs

        if batch_size < 1 or chunk < 1:
            raise ValueError(f"batch_size and chunk must be >= 1, got {batch_size} and {chunk}")
        dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        self.batch_size = batch_size
        self.model_cfg = ModelConfig.from_pretrained(ckpt_dir)
        self.tok = QwenTokenizer.from_pretrained(ckpt_dir)
        self.proc = ImageProcessorConfig.from_pretrained(ckpt_dir)
        with nnx.use_eager_sharding(False):
            model = hf_io.load_model(ckpt_dir, dtype=dtypes[dtype])
        graphdef, self._params = nnx.split(model)

        def logprobs(params, ids, pos, mask, targets, pix, vi):
            m = nnx.merge(graphdef, params)
            hidden, _ = m.hidden_states(ids, pos, mask, pix, vi)
            return token_logprobs(m, hidden, targets, chunk=chunk)[0]

        self._fn = jax.jit(logprobs)

    def parse(self, text: str, base: str, qid: str = "") -> Example:
        return parse_line(text, base, self.tok, self.proc, self.model_cfg, qid)

    def score(self, examples: Sequence[Example]) -> list[np.ndarray]:
        """log p(input_ids[t] | input_ids[:t]) for t >= 1, one (length - 1,) float32 array per example."""
        out = []
        for start in range(0, len(examples), self.batch_size):
            group = list(examples[start : start + self.batch_size])
            n_real = len(group)
            group += [_filler(self.proc.patch_dim, self.tok.endoftext)] * (self.batch_size - n_real)
            b = collate(group, pad_id=self.tok.endoftext, vision_cfg=self.model_cfg.vision)
            lp = np.asarray(
                self._fn(
                    self._params,
                    b.input_ids,
                    b.positions,
                    b.attention_mask,
                    b.targets,
                    b.pixel_values,
                    b.vision_inputs,
                )
            )
            # Prediction alignment: column t holds log p(input_ids[t + 1]).
            out += [lp[i, : ex.length - 1] for i, ex in enumerate(group[:n_real])]
        return out


def result_row(ex: Example, lp: np.ndarray) -> dict[str, Any]:
    """{"input_ids": [...], "logprobs": [null, ...]} with logprobs[t] = log p(input_ids[t] | prefix)."""
    return {"input_ids": ex.input_ids.tolist(), "logprobs": [None, *(float(x) for x in lp)]}


@dataclasses.dataclass
class ScoreReport:
    """Counts of one run; `bad` lists (line number, reason)."""

    scored: int = 0
    bad: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def _windows(lines: Iterable[str], size: int) -> Iterable[list[tuple[int, str]]]:
    window: list[tuple[int, str]] = []
    for n, line in enumerate(lines, start=1):
        window.append((n, line))
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def score_file(scorer: Scorer, input_path: str, output_path: str, *, log=None, progress: bool = True):
    """Scores every line of `input_path` into `output_path`, line for line; returns a ScoreReport.

    A bad line is reported on `log` with its number and written as {"error": ...}; the run goes on.
    """
    from pixel_reasoner_jax.metrics import progress as progress_bar

    log = sys.stderr if log is None else log

    base = os.path.dirname(os.path.abspath(input_path))
    with open(input_path, encoding="utf-8") as f:
        total = sum(1 for _ in f)
    report = ScoreReport()
    bar = progress_bar(total, desc="score", enabled=progress, file=log)
    with open(input_path, encoding="utf-8") as fin, open(output_path, "w", encoding="utf-8") as fout:
        for window in _windows(fin, scorer.batch_size * WINDOW_BATCHES):
            rows: dict[int, dict] = {}
            good: list[tuple[int, Example]] = []
            for n, line in window:
                try:
                    good.append((n, scorer.parse(line, base, qid=f"line {n}")))
                except BadLine as e:
                    rows[n] = {"error": f"line {n}: {e}"}
                    report.bad.append((n, str(e)))
                    print(f"line {n}: {e}", file=log)
            # Similar lengths share a batch: less padding per bucket.
            good.sort(key=lambda item: item[1].length)
            for (n, ex), lp in zip(good, scorer.score([ex for _, ex in good])):
                rows[n] = result_row(ex, lp)
            for n, _ in window:
                fout.write(json.dumps(rows[n]) + "\n")
            report.scored += len(good)
            bar.update(len(window))
    bar.close()
    print(f"scored {report.scored} conversations; {len(report.bad)} bad lines written as errors", file=log)
    return report


def main(argv: Sequence[str] | None = None) -> ScoreReport:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--input", required=True, help='JSONL, one {"messages": [...]} per line')
    parser.add_argument("--output", required=True, help="JSONL written line for line")
    parser.add_argument("--batch-size", type=int, default=4, help="conversations per jitted call")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per log-softmax chunk")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.chunk < 1:
        parser.error(f"--batch-size and --chunk must be >= 1, got {args.batch_size} and {args.chunk}")
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input!r} is not a file")
    import jax

    if args.dtype == "float32":
        # A comparison primitive: full float32 matmuls (no TF32 / bf16 passes on accelerators).
        jax.config.update("jax_default_matmul_precision", "highest")
    scorer = Scorer(args.checkpoint, batch_size=args.batch_size, chunk=args.chunk, dtype=args.dtype)
    return score_file(scorer, args.input, args.output, progress=not args.no_progress)


if __name__ == "__main__":
    main()
