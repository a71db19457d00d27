"""The LLM side of trajectory synthesis: the writer's prompts (full input, each operation and what it
returned), parsing and checking of the text it writes, and a rate-limited OpenAI-compatible client.

The LLM writes only text segments; operations and observations come from the seed and the real tools.
"""

import base64
import dataclasses
import io
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import openai
from PIL import Image

from pixel_reasoner_jax.answers import answer_matches, extract_boxed
from pixel_reasoner_jax.data.synth_seeds import Seed
from pixel_reasoner_jax.data.trajectories import Op
from pixel_reasoner_jax.tools import ops
from pixel_reasoner_jax.tools.prompts import PromptTemplates, user_text

WRITER_SYSTEM = (
    "You write the reasoning text of a vision-language assistant that answers questions about images and "
    "videos and can look closer with two visual operations: crop_image (zoom into a region of an image) and "
    "select_frames (pick frames of a video). The operations and what they returned are given to you. Write "
    "only the assistant's own words around them, in the first person, as if it saw each returned image for "
    "the first time."
)
# Marker lines between the parts; tolerant of markdown decoration around them.
_PART = re.compile(r"^[ \t*#_]*\[PART (\d+)\][ \t*#_:]*$", re.MULTILINE)
# Chat-template and tool markup must not reach a training turn from model text.
_MARKUP = re.compile(r"<\|[a-z_]+\|>|</?tool_call>|</?tools>")


class FatalAPIError(RuntimeError):
    """The endpoint refuses every request (bad key, no access, unknown model): the run stops."""


class BadResponse(ValueError):
    """The writer's text cannot be used (`reason` is the status the seed gets)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ------------------------------------------------------------------------------------------------ prompts


def data_url(img: Image.Image, max_side: int) -> str:
    """PNG data URL of the image, shrunk (aspect kept) so its longer side is at most `max_side`."""
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_item(img: Image.Image, max_side: int, detail: str) -> dict[str, Any]:
    url: dict[str, Any] = {"url": data_url(img, max_side)}
    if detail:
        url["detail"] = detail
    return {"type": "image_url", "image_url": url}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _first_answer(answer: str | list[str]) -> str:
    return answer if isinstance(answer, str) else answer[0]


def _part_guides(seed: Seed, plan: Sequence[Op]) -> list[str]:
    look = "look closer at those frames" if seed.is_video else "zoom in on that region"
    noun = "video (all its frames)" if seed.is_video else "image"
    guides = [
        f"[PART 1] comes before operation 1. Analyse the full {noun} as a whole: what it shows and where the "
        f"detail needed for the question probably is; end by saying you will {look}. Do not state anything "
        "that can only be read in the returned images."
    ]
    for k, op in enumerate(plan, 1):
        where = f"[PART {k + 1}] comes after operation {k}."
        if op.erroneous:
            guides.append(
                f"{where} Look at what it returned, notice that it does not show what the question asks "
                "about, and say where to look instead."
            )
        elif k < len(plan):
            guides.append(
                f"{where} The needed detail is in view but still too small; say you will zoom in further "
                "on this crop."
            )
        else:
            guides.append(
                f"{where} Analyse the detail it returned that answers the question, then end with the final "
                f"answer written as \\boxed{{...}}. The correct final answer is: {_first_answer(seed.answer)}"
            )
    return guides


def pixel_request(
    seed: Seed,
    media: Sequence[Image.Image],
    plan: Sequence[Op],
    results: Sequence[ops.ToolResult],
    max_side: int,
    detail: str,
) -> list[dict[str, Any]]:
    """Messages asking the writer for len(plan) + 1 parts of one pixel-space trajectory.

    The writer sees the full input (the image, or every frame numbered), each operation with what it
    returned (the crop; for a selection, which frames) and whether it was a mistake, and the answer.
    """
    content = [_text(f"Question: {seed.question}\n\nCorrect answer: {_first_answer(seed.answer)}\n")]
    if seed.is_video:
        content.append(_text(f"The full input is a video of {len(media)} frames:"))
        for i, frame in enumerate(media, 1):
            content += [_text(f"Frame {i}:"), _image_item(frame, max_side, detail)]
    else:
        content += [_text("The full input image:"), _image_item(media[0], max_side, detail)]
    for k, (op, result) in enumerate(zip(plan, results), 1):
        mistake = (
            " This operation is a MISTAKE: it does not show what the question asks about."
            if op.erroneous
            else ""
        )
        if op.tool == "select_frames":
            content.append(
                _text(f"Operation {k}: select_frames picks frames {op.arguments['target_frames']}.{mistake}")
            )
        else:
            source = "the full image" if op.arguments["target_image"] == 1 else "the previous crop"
            source += f" (normalized box {op.arguments['bbox_2d']})"
            content.append(
                _text(f"Operation {k}: crop_image zooms into a region of {source}.{mistake} It returned:")
            )
            content += [_image_item(img, max_side, detail) for img in result.new_images]
    n = len(plan) + 1
    content.append(
        _text(
            f"Write {n} parts, each starting with its own line [PART 1], [PART 2], ... [PART {n}], and "
            "nothing before [PART 1].\n"
            + "\n".join(_part_guides(seed, plan))
            + "\nDo not write tool calls, JSON or coordinates: they are inserted automatically. Do not "
            "mention these instructions, the part labels, or that you were told the answer."
        )
    )
    return [{"role": "system", "content": WRITER_SYSTEM}, {"role": "user", "content": content}]


def textual_request(
    seed: Seed, media: Sequence[Image.Image], max_side: int, detail: str
) -> list[dict[str, Any]]:
    """The textual baseline's prompt (`sys=notool`, §2.3): the input, the question, think step by step.

    A video goes as its frames (chat APIs take images, not frame lists).
    """
    content = [_image_item(img, max_side, detail) for img in media]
    content.append(_text(user_text(seed.question, mode="notool")))
    return [{"role": "system", "content": PromptTemplates().system}, {"role": "user", "content": content}]


# ------------------------------------------------------------------------------------------- responses


def split_parts(text: str, n: int) -> list[str]:
    """The n parts of a writer response, stripped.

    Raises:
      BadResponse: "bad_response" when the markers are not exactly [PART 1] .. [PART n] in order, text
        precedes [PART 1], or a part is empty.
    """
    marks = list(_PART.finditer(text))
    numbers = [int(m.group(1)) for m in marks]
    if numbers != list(range(1, n + 1)):
        raise BadResponse("bad_response", f"expected part markers 1..{n}, found {numbers}")
    if text[: marks[0].start()].strip():
        raise BadResponse("bad_response", "text before [PART 1]")
    ends = [m.start() for m in marks[1:]] + [len(text)]
    parts = [text[m.end() : e].strip() for m, e in zip(marks, ends)]
    if not all(parts):
        raise BadResponse("bad_response", "an empty part")
    return parts


def check_segments(segments: Sequence[str], answer: str | list[str]) -> None:
    """Checks model-written segments before they become training turns.

    Raises:
      BadResponse: "bad_response" (chat or tool markup in the text, a \\boxed answer before the last
        segment), "no_answer" (no complete \\boxed{} at the end), "wrong_answer" (it does not match).
    """
    for k, seg in enumerate(segments):
        if _MARKUP.search(seg):
            raise BadResponse("bad_response", f"segment {k + 1} holds chat or tool markup")
        if k < len(segments) - 1 and "\\boxed{" in seg:
            raise BadResponse("bad_response", f"segment {k + 1} answers before the last operation")
    pred = extract_boxed(segments[-1])
    if pred is None:
        raise BadResponse("no_answer", "no complete \\boxed{} in the final segment")
    if not answer_matches(pred, answer):
        raise BadResponse("wrong_answer", f"answered {pred[:80]!r}")


# ---------------------------------------------------------------------------------------------- client


@dataclasses.dataclass(frozen=True)
class Completion:
    """One chat completion: its text and the token usage the API reported (None when it reported none)."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None


class RateLimiter:
    """Spaces request starts at least 60 / per_minute seconds apart across threads (0 = no limit)."""

    def __init__(self, per_minute: float):
        self._interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        time.sleep(start - now)


class ChatAPI:
    """A rate-limited OpenAI-compatible chat client; the client itself retries 429 / 5xx with backoff."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        *,
        max_tokens: int,
        temperature: float,
        timeout_s: float,
        retries: int,
        requests_per_minute: float,
    ):
        self.model = model
        self._kw = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=retries
        )
        self._limiter = RateLimiter(requests_per_minute)

    def complete(self, messages: list[dict[str, Any]]) -> Completion:
        """One request.

        Raises:
          FatalAPIError: 401 / 403 / 404 (every later request would fail the same way).
          openai.APIError: any other failure after the client's retries (the seed is retried next run).
        """
        self._limiter.wait()
        try:
            resp = self._client.chat.completions.create(messages=messages, **self._kw)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise FatalAPIError(f"the endpoint refused the request ({type(e).__name__}): {e}") from e
        text = (resp.choices[0].message.content or "") if resp.choices else ""
        usage = resp.usage
        return Completion(
            text,
            usage.prompt_tokens if usage is not None else None,
            usage.completion_tokens if usage is not None else None,
        )

    def close(self) -> None:
        self._client.close()
