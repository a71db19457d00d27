"""Evaluation metrics: ANLS (own Levenshtein), the per-sample result row and its scoring.

Aggregation, the per-sample dump I/O and the report tables live in eval/report.py.

Host-side Python only. Definitions follow reference/benchmarks.md §3 and reference/pixel_reasoner.md §10.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# Re-exported: the eval runner and reports name benchmarks through em.canonical_benchmark.
from pixel_reasoner_jax.data.benchmarks import canonical_benchmark as canonical_benchmark
from pixel_reasoner_jax.train.rewards import accuracy_reward, extract_boxed

ANLS_THRESHOLD = 0.5
# Benchmarks whose reported number is ANLS (the author computed it offline from the dumps, issue #6); the
# others report rule-reward accuracy.
ANLS_BENCHMARKS = frozenset({"infovqa"})


# ---------------------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two strings.

    Two-row dynamic programme, O(len(a) * len(b)) time and O(min) memory.
    """
    if not isinstance(a, str) or not isinstance(b, str):
        raise TypeError(
            f"levenshtein: both arguments must be str, got {type(a).__name__}, {type(b).__name__}"
        )
    if len(a) < len(b):
        a, b = b, a  # the shorter string indexes the rows we keep
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def anls_normalize(s: str) -> str:
    """Lower-cased, leading/trailing whitespace stripped, inner whitespace runs collapsed to one space."""
    if not isinstance(s, str):
        raise TypeError(f"anls_normalize: expected str, got {type(s).__name__}")
    return " ".join(s.lower().split())


def normalized_levenshtein(pred: str, gt: str) -> float:
    """NL = edit distance / max(len(gt), len(pred)) of the normalised strings; 0.0 when both are empty.

    The Qwen-VL script divides by the lengths of the RAW strings; we use the normalised ones (the DocVQA
    definition), which differs only when normalisation changes a length (extra inner/outer whitespace).
    """
    p, g = anls_normalize(pred), anls_normalize(gt)
    longest = max(len(p), len(g))
    if longest == 0:
        return 0.0
    return levenshtein(p, g) / longest


def _gt_list(gt: str | Sequence[str], what: str) -> list[str]:
    if isinstance(gt, str):
        return [gt]
    if isinstance(gt, (list, tuple)) and gt and all(isinstance(g, str) for g in gt):
        return list(gt)
    raise TypeError(f"{what}: gt must be a str or a non-empty list of str, got {gt!r}")


def anls_score(pred: str, gt: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one question: max over its ground truths of (1 - NL if NL < threshold else 0).

    Args:
        pred: the predicted answer text (the boxed content; "" when there is none).
        gt: one accepted answer or a non-empty list of them.
        threshold: tau; a prediction at NL >= tau scores 0 (0.5 in the benchmark).
    """
    if not isinstance(pred, str):
        raise TypeError(f"anls_score: pred must be str, got {type(pred).__name__}")
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
        raise ValueError(f"anls_score: threshold must be in (0, 1], got {threshold!r}")
    best = 0.0
    for g in _gt_list(gt, "anls_score"):
        nl = normalized_levenshtein(pred, g)
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def anls(
    preds: Sequence[str], gts: Sequence[str | Sequence[str]], threshold: float = ANLS_THRESHOLD
) -> float:
    """Mean ANLS over questions (`preds[i]` against `gts[i]`)."""
    if len(preds) != len(gts):
        raise ValueError(f"anls: {len(preds)} predictions but {len(gts)} ground truths")
    if not preds:
        raise ValueError("anls: no questions; expected at least one prediction")
    return sum(anls_score(p, g, threshold) for p, g in zip(preds, gts)) / len(preds)


# ---------------------------------------------------------------------------------------------------------
# Per-sample results
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """One evaluated response: one line of the per-sample dump.

    Attributes:
        qid: the record id.
        benchmark: the canonical benchmark name.
        question: the raw question text.
        gt: the accepted answer(s).
        response: the assistant text of the whole trajectory (tool observations excluded).
        boxed: the content of the last `\\boxed{}`, or None.
        correct: the accuracy rule reward was 1.
        anls: ANLS of `boxed` ("" when None) against `gt`.
        n_calls: tool-call turns, failed ones and an unexecuted last one (stopped by a limit) included.
        n_failed: executed calls that returned an error observation.
        n_valid: executed calls that succeeded (valid visual operations).
        status: how the episode ended (a key of rollout/episode.py STATUSES, or "media_error").
        sample: index of this response among the query's samples (0 for greedy).
        n_tokens: length of the conversation in model tokens (image pads expanded); 0 when unknown.
        n_extra_keys: keys of the response's tool calls that no tool reads (ignored, as the original did).
        category: the record's category (V* direct_attributes / relative_position, MVBench task), or None.
        target_box: the record's normalised target box(es) in its first image, or None.
        crop_boxes: normalised [x1, y1, x2, y2] of the executed crops of the first input image (image query),
            in its coordinates through crops of crops: what the viewer draws over that image.
        crop_origins: every executed crop as {"image": original image or video frame index, "box": [...]}.
        faithful: rollout/faithfulness.sample_faithfulness of the response, or None (no target / video).
        turns: the conversation after the prompt, for the viewer: {"role": "assistant" | "tool", "text",
            "images": [paths relative to the eval folder]} in order.
        inputs: the query's input images (a video: its first frame), as paths relative to the eval folder.
    """

    qid: str
    benchmark: str
    question: str
    gt: str | list[str]
    response: str
    boxed: str | None
    correct: bool
    anls: float
    n_calls: int
    n_failed: int
    n_valid: int
    status: str
    sample: int = 0
    n_tokens: int = 0
    n_extra_keys: int = 0
    category: str | None = None
    target_box: list | None = None
    crop_boxes: list = dataclasses.field(default_factory=list)
    crop_origins: list = dataclasses.field(default_factory=list)
    faithful: dict | None = None
    turns: list = dataclasses.field(default_factory=list)
    inputs: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        for name in ("qid", "benchmark", "question", "response", "status"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"SampleResult.{name} must be str, got {getattr(self, name)!r}")
        _gt_list(self.gt, f"SampleResult {self.qid}")
        if self.boxed is not None and not isinstance(self.boxed, str):
            raise TypeError(f"SampleResult.boxed must be str or None, got {self.boxed!r}")
        if not isinstance(self.correct, bool):
            raise TypeError(f"SampleResult.correct must be bool, got {self.correct!r}")
        if not (isinstance(self.anls, (int, float)) and 0.0 <= self.anls <= 1.0):
            raise ValueError(f"SampleResult.anls must be a number in [0, 1], got {self.anls!r}")
        for name in ("n_calls", "n_failed", "n_valid", "sample", "n_tokens", "n_extra_keys"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SampleResult.{name} must be an int >= 0, got {v!r}")
        if self.n_valid + self.n_failed > self.n_calls:
            raise ValueError(
                f"SampleResult {self.qid}: n_valid {self.n_valid} + n_failed {self.n_failed} exceeds "
                f"n_calls {self.n_calls}"
            )

    def to_json(self) -> dict[str, Any]:
        """The dump row (plain JSON types)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "SampleResult":
        """Parses a dump row; unknown keys are ignored, missing ones raise naming the key."""
        names = [f.name for f in dataclasses.fields(cls)]
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"dump row {row.get('qid', '?')!r} lacks keys {missing}; expected {names}")
        return cls(**{k: row[k] for k in names if k in row})


def score_response(
    response: str,
    gt: str | Sequence[str],
    *,
    require_boxed: bool = True,
    ended_after_failed_call: bool = False,
) -> tuple[str | None, bool, float]:
    """Scores one response as the training reward does, plus ANLS of its boxed answer.

    Args:
        response: the assistant text of the trajectory.
        gt: accepted answer(s).
        require_boxed: passed to `accuracy_reward`.
        ended_after_failed_call: passed to `accuracy_reward` (a correct answer right after a failed call
            scores 0 there); ANLS ignores it, as the offline ANLS of the original read only the answer.

    Returns:
        (boxed answer or None, correct, anls).
    """
    boxed = extract_boxed(response)
    correct = (
        accuracy_reward(
            response, gt, require_boxed=require_boxed, ended_after_failed_call=ended_after_failed_call
        )
        == 1.0
    )
    return boxed, correct, anls_score(boxed if boxed is not None else "", gt)
