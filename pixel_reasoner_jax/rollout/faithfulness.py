"""Crop faithfulness: did the executed crops show the target the question is about?

Shared by the eval report and the GRPO rollout metrics; reads trajectories and their records' `target_box`.

Motivation: CodeV (arXiv 2511.19661) found that only 43% of Pixel-Reasoner's correct V* answers come with a
crop that contains the queried object, so accuracy alone does not show pixel-space reasoning.

Definition (geometric, no judge model). A crop's box is mapped back to ORIGINAL image coordinates through
crops of crops (tools/ops.Origin). The target is a normalised [x1, y1, x2, y2] box of the query's FIRST
image (or a list of such boxes). A crop CONTAINS a target box when it was cut from that image and covers at
least MIN_COVERAGE of the target's area (default 1.0: the whole box, up to float rounding). Then:
  * crop_hit_rate: share of executed crops (on records with a target) that contain at least one target box;
  * a response SAW the target when every target box is contained by at least one of its crops;
  * correct_saw_target: among correct responses with >= 1 executed crop, the share that saw the target
    (CodeV's 43% statistic).
"""

from collections.abc import Sequence
from typing import Any

from pixel_reasoner_jax.rollout.trajectory import Trajectory
from pixel_reasoner_jax.tools.parse import CROP_TOOLS

MIN_COVERAGE = 1.0
_EPS = 1e-6  # crop boxes are int-truncated pixels divided by the image size


def target_boxes(record: Any) -> list[tuple[float, float, float, float]]:
    """The record's target box(es), normalised; [] when it has none (`target_box` is an optional field)."""
    raw = getattr(record, "target_box", None)
    if raw is None:
        return []
    boxes = raw if raw and isinstance(raw[0], Sequence) else [raw]
    out = []
    for b in boxes:
        if len(b) != 4 or not all(isinstance(v, int | float) for v in b) or not (b[0] < b[2] and b[1] < b[3]):
            raise ValueError(
                f"record {getattr(record, 'qid', '?')!r}: target_box must be normalised [x1, y1, x2, y2] "
                f"with x1 < x2 and y1 < y2 (or a list of them), got {raw!r}"
            )
        out.append(tuple(float(v) for v in b))
    return out


def executed_crops(traj: Trajectory) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(original image index, normalised box) of every crop the episode executed, in order."""
    return [
        t.tool_origins[0]
        for t in traj.turns
        if t.tool_ok and t.tool_name in CROP_TOOLS and t.tool_origins and t.tool_origins[0] is not None
    ]


def coverage(crop: Sequence[float], target: Sequence[float]) -> float:
    """Share of the target box's area inside the crop box (both [x1, y1, x2, y2] in one coordinate frame)."""
    w = min(crop[2], target[2]) - max(crop[0], target[0])
    h = min(crop[3], target[3]) - max(crop[1], target[1])
    area = (target[2] - target[0]) * (target[3] - target[1])
    return max(w, 0.0) * max(h, 0.0) / area if area > 0 else 0.0


def contains(crop: Sequence[float], target: Sequence[float], min_coverage: float = MIN_COVERAGE) -> bool:
    """The crop covers at least `min_coverage` of the target's area."""
    return coverage(crop, target) >= min_coverage - _EPS


def sample_faithfulness(traj: Trajectory, min_coverage: float = MIN_COVERAGE) -> dict[str, Any] | None:
    """{"n_crops", "n_hits", "saw_target"} of one image episode whose record has a target; None otherwise."""
    targets = target_boxes(traj.record)
    if not targets or getattr(traj.record, "is_video", False):
        return None
    crops = [box for image, box in executed_crops(traj) if image == 0]
    hits = [any(contains(c, t, min_coverage) for t in targets) for c in crops]
    saw = bool(crops) and all(any(contains(c, t, min_coverage) for c in crops) for t in targets)
    return {"n_crops": len(executed_crops(traj)), "n_hits": sum(hits), "saw_target": saw}


def faithfulness_summary(
    rows: Sequence[dict[str, Any] | None], correct: Sequence[bool]
) -> dict[str, float | None]:
    """crop_hit_rate, saw_target_rate and correct_saw_target over per-sample results of sample_faithfulness.

    Rows that are None (no target, or a video) are left out; a rate with an empty denominator is None.
    """
    pairs = [(r, c) for r, c in zip(rows, correct, strict=True) if r is not None]
    n_crops = sum(r["n_crops"] for r, _ in pairs)
    with_crops = [(r, c) for r, c in pairs if r["n_crops"] > 0]
    correct_with_crops = [r for r, c in with_crops if c]
    return {
        "n_with_target": len(pairs),
        "crop_hit_rate": sum(r["n_hits"] for r, _ in pairs) / n_crops if n_crops else None,
        "saw_target_rate": sum(r["saw_target"] for r, _ in with_crops) / len(with_crops)
        if with_crops
        else None,
        "correct_saw_target": (
            sum(r["saw_target"] for r in correct_with_crops) / len(correct_with_crops)
            if correct_with_crops
            else None
        ),
    }


def rollout_metrics(trajs: Sequence[Trajectory], correct: Sequence[bool]) -> dict[str, float]:
    """The GRPO metrics `faithful/*` of one rollout batch (only the rates that have a denominator)."""
    summary = faithfulness_summary([sample_faithfulness(t) for t in trajs], correct)
    return {f"faithful/{k}": float(v) for k, v in summary.items() if v is not None and k != "n_with_target"}
