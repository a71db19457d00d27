"""SFT trajectory skeletons shared by the synthetic generator and the LLM synthesis: which visual operations
each trajectory kind makes, running them with the real tools, and assembling text segments into messages.

Kinds (reference §7.1, "single-pass" and "error-induced self-correction"): image single / recrop1 / recrop2 /
zoom2, video select / reselect, and textual (no operation). Erroneous operations carry `"loss": false`.
"""

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from pixel_reasoner_jax.tools import ops
from pixel_reasoner_jax.tools.prompts import PromptTemplates, system_prompt, user_text

IMAGE_KINDS = ("single", "recrop1", "recrop2", "zoom2")
VIDEO_KINDS = ("select", "reselect")
TEXTUAL = "textual"


class PlanError(ValueError):
    """A trajectory kind cannot be built for this target (e.g. no off-target region exists)."""


@dataclasses.dataclass(frozen=True)
class Op:
    """One visual operation of a trajectory.

    Attributes:
      tool: "crop_image" or "select_frames".
      arguments: the call's arguments exactly as the assistant turn writes them.
      erroneous: the wrong operation of a self-correction trajectory (its turn is not trained).
    """

    tool: str
    arguments: dict[str, Any]
    erroneous: bool = False


def norm_box(box: Sequence[float], size: tuple[int, int], decimals: int = 3) -> list[float]:
    """Pixel box -> fractions rounded outward to `decimals` (so it still covers the target), all < 1."""
    w, h = size
    x1, y1, x2, y2 = box
    scale = 10**decimals
    top = 1 - 1 / scale
    return [
        float(np.floor(x1 / w * scale) / scale),
        float(np.floor(y1 / h * scale) / scale),
        min(top, float(np.ceil(x2 / w * scale) / scale)),
        min(top, float(np.ceil(y2 / h * scale) / scale)),
    ]


def tool_call_text(op: Op) -> str:
    """The `<tool_call>` block of an assistant turn (reference §3)."""
    return "<tool_call>\n" + json.dumps({"name": op.tool, "arguments": op.arguments}) + "\n</tool_call>"


def _off_target(
    rng, target: list[float], pad: float, avoid: list[list[float]], decimals: int = 3
) -> list[float]:
    """A box of the target's size whose padded crop misses the target (and differs from `avoid`)."""
    bw, bh = target[2] - target[0], target[3] - target[1]
    if bw > 0.94 or bh > 0.94:
        raise PlanError(f"target {target} covers the image; no off-target crop exists")
    for _ in range(500):
        x, y = float(rng.uniform(0.03, 0.97 - bw)), float(rng.uniform(0.03, 0.97 - bh))
        cand = [round(v, decimals) for v in (x, y, x + bw, y + bh)]
        padded = (cand[0] - pad, cand[1] - pad, cand[2] + pad, cand[3] + pad)
        misses = (
            padded[2] < target[0] or padded[0] > target[2] or padded[3] < target[1] or padded[1] > target[3]
        )
        if misses and cand not in avoid:
            return cand
    raise PlanError(f"no off-target box found for target {target}: the target (with padding) is too large")


def plan_image_ops(
    rng: np.random.Generator,
    kind: str,
    box: Sequence[float],
    size: tuple[int, int],
    padding: str,
    decimals: int = 3,
) -> list[Op]:
    """The crops of an image trajectory of `kind` for a target at pixel `box` of an image of `size`.

    single: one crop on the target. recrop1 / recrop2: one / two crops of the target's size that miss it
    (erroneous), then the target. zoom2: a coarse crop around the target, then the target inside that crop
    (target_image 2). `padding` is the crop tool's ("capped" or "fixed"); off-target boxes keep clear of
    the target by it plus two pixels of rounding slack. Boxes are written with `decimals` decimals.

    Raises:
      PlanError: no off-target region exists (recrop kinds); ValueError: an unknown kind.
    """
    target = norm_box(box, size, decimals)
    if kind == "single":
        return [Op("crop_image", {"bbox_2d": target, "target_image": 1})]
    if kind in ("recrop1", "recrop2"):
        pad = (0.1 if padding == "fixed" else min(0.1, 600 / min(size))) + 2 / min(size)
        wrong = [_off_target(rng, target, pad, [], decimals)]
        if kind == "recrop2":
            wrong.append(_off_target(rng, target, pad, wrong, decimals))
        return [Op("crop_image", {"bbox_2d": b, "target_image": 1}, erroneous=True) for b in wrong] + [
            Op("crop_image", {"bbox_2d": target, "target_image": 1})
        ]
    if kind == "zoom2":
        # Wide enough that the crop of the crop (target + padding of this crop) stays above 28 px.
        side = min(
            0.9, max(0.3, 3 * (target[2] - target[0]), 3 * (target[3] - target[1]), 150 / min(size) - 0.2)
        )
        cx, cy = (target[0] + target[2]) / 2, (target[1] + target[3]) / 2
        x0 = min(max(cx - side / 2, 0.01), 0.98 - side)
        y0 = min(max(cy - side / 2, 0.01), 0.98 - side)
        coarse = [round(v, decimals) for v in (x0, y0, x0 + side, y0 + side)]
        # The second box is the target in fractions of the first crop; resizing keeps fractions.
        bx1, by1, bx2, by2 = ops.crop_box(tuple(coarse), size, padding=padding)
        inner = (box[0] - bx1, box[1] - by1, box[2] - bx1, box[3] - by1)
        return [
            Op("crop_image", {"bbox_2d": coarse, "target_image": 1}),
            Op(
                "crop_image",
                {"bbox_2d": norm_box(inner, (bx2 - bx1, by2 - by1), decimals), "target_image": 2},
            ),
        ]
    raise ValueError(f"unknown image trajectory kind {kind!r}; expected one of {IMAGE_KINDS}")


def plan_video_ops(rng: np.random.Generator, kind: str, right: Sequence[int], num_frames: int) -> list[Op]:
    """The selections of a video trajectory: `right` (1-based frames showing the answer) once (select),
    or first a disjoint run of up to 4 frames (erroneous), then `right` (reselect).

    Raises:
      PlanError: no disjoint run exists (reselect); ValueError: an unknown kind or frames out of range.
    """
    right = [int(f) for f in right]
    if not right or any(not 1 <= f <= num_frames for f in right):
        raise ValueError(f"frames {right} must be a non-empty list within [1, {num_frames}]")
    select = Op("select_frames", {"target_frames": right})
    if kind == "select":
        return [select]
    if kind != "reselect":
        raise ValueError(f"unknown video trajectory kind {kind!r}; expected one of {VIDEO_KINDS}")
    k = min(len(right), 4)
    lo, hi = min(right), max(right)
    starts = [s for s in range(1, num_frames - k + 2) if s + k - 1 < lo or s > hi]
    if not starts:
        raise PlanError(f"frames {right} leave no run of {k} other frames to select first")
    s0 = int(rng.choice(starts))
    return [Op("select_frames", {"target_frames": list(range(s0, s0 + k))}, erroneous=True), select]


def spread(frames: Sequence[int], most: int) -> list[int]:
    """At most `most` of `frames`, evenly spaced, first and last kept."""
    frames = list(frames)
    if len(frames) <= most:
        return frames
    idx = np.linspace(0, len(frames) - 1, most).round().astype(int)
    return [frames[i] for i in idx]


def allocate_kinds(n: int, weights: Mapping[str, float], seed: int) -> list[str]:
    """Exactly the weighted mix over n items (largest-remainder quotas), shuffled by the seed."""
    total = sum(weights.values())
    if n and total <= 0:
        raise ValueError(f"kind weights must have a positive sum, got {dict(weights)}")
    weights = {k: w / total for k, w in weights.items()} if total > 0 else dict(weights)
    quotas = {k: int(np.floor(n * w)) for k, w in weights.items()}
    by_remainder = sorted(weights, key=lambda k: (-(n * weights[k] - quotas[k]), k))
    for k in by_remainder[: n - sum(quotas.values())]:
        quotas[k] += 1
    kinds = [k for k in weights for _ in range(quotas[k])]
    order = np.random.default_rng([seed, 0]).permutation(n)
    return [kinds[i] for i in order]


def run_ops(state: ops.VisualState, plan: Sequence[Op], cfg: ops.OpsConfig) -> list[ops.ToolResult]:
    """Runs the planned operations with the real tools, in order.

    Raises:
      PlanError: an operation failed (its error text says why).
    """
    results = []
    for k, op in enumerate(plan):
        if op.tool == "crop_image":
            result = ops.crop_image(state, op.arguments["bbox_2d"], op.arguments["target_image"], cfg)
        else:
            result = ops.select_frames(state, op.arguments["target_frames"], cfg)
        if not result.ok:
            raise PlanError(f"operation {k + 1} ({op.tool} {op.arguments}) failed: {result.error}")
        results.append(result)
        state = ops.apply_result(state, result)
    return results


def first_messages(
    media_item: dict[str, Any], question: str, templates: PromptTemplates | None = None
) -> list[dict[str, Any]]:
    """System turn (tool block) and user turn (media first, then question + vcot guideline, §2.3), in the
    strings of `templates` (None = the released ones)."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt(templates)}]},
        {"role": "user", "content": [media_item, {"type": "text", "text": user_text(question, templates)}]},
    ]


def frame_placer(
    plan: Sequence[Op],
    frames: Sequence[Image.Image],
    frame_paths: Sequence[str],
    write: Callable[[Image.Image, int], str],
) -> Callable[[int, int, Image.Image], str]:
    """An `assemble` placer for select_frames observations: a frame returned unresized names its stored
    frame file; a resized one is written by `write(image, n)`, n = its 1-based number among returned images.
    """
    returned = 0

    def place(k: int, i: int, img: Image.Image) -> str:
        nonlocal returned
        returned += 1
        f = plan[k].arguments["target_frames"][i]
        if img.size == frames[f - 1].size:
            return frame_paths[f - 1]
        return write(img, returned)

    return place


def assemble(
    head: list[dict[str, Any]],
    segments: Sequence[str],
    plan: Sequence[Op],
    results: Sequence[ops.ToolResult],
    place: Callable[[int, int, Image.Image], str],
) -> list[dict[str, Any]]:
    """The full message list: after `head`, one assistant turn per operation (its text segment and a newline
    unless the segment is empty, then the tool call), the tool's observation as a user turn, and a final
    assistant turn.

    Args:
      head: the system and user turns.
      segments: len(plan) + 1 texts; segment k precedes operation k, the last one is the answer turn.
      plan, results: the operations and what run_ops returned for them.
      place: (operation index, image index, image) -> the path the observation names for that image.
    """
    if len(segments) != len(plan) + 1 or len(results) != len(plan):
        raise ValueError(
            f"need {len(plan) + 1} segments and {len(plan)} results, got {len(segments)}, {len(results)}"
        )
    messages = list(head)
    for k, (op, result) in enumerate(zip(plan, results)):
        turn = {
            "role": "assistant",
            "content": [
                {"type": "text", "text": (segments[k] + "\n" if segments[k] else "") + tool_call_text(op)}
            ],
        }
        if op.erroneous:
            turn["loss"] = False  # the erroneous operation of a self-correction trajectory
        messages.append(turn)
        content = [{"type": "text", "text": result.text}]
        content += [{"type": "image", "image": place(k, i, img)} for i, img in enumerate(result.new_images)]
        messages.append({"role": "user", "content": content})
    messages.append({"role": "assistant", "content": [{"type": "text", "text": segments[-1]}]})
    return messages
