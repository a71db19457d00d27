"""Evaluation metrics: ANLS (the Qwen-VL script's, on rapidfuzz), the per-sample result row and its scoring
(answers.py). Aggregation, the per-sample dump I/O and the report tables live in eval/report.py.

Host-side Python only. Definitions follow reference/benchmarks.md §3 and reference/pixel_reasoner.md §10.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from rapidfuzz.distance import Levenshtein

from pixel_reasoner_jax import answers
from pixel_reasoner_jax.answers import extract_boxed

# Re-exported: the eval runner and reports name benchmarks through em.canonical_benchmark.
from pixel_reasoner_jax.data.benchmarks import canonical_benchmark as canonical_benchmark

ANLS_THRESHOLD = 0.5
# Benchmarks whose reported number is ANLS (the author computed it offline from the dumps, issue #6); the
# others report rule-reward accuracy.
ANLS_BENCHMARKS = frozenset({"infovqa"})


# ---------------------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------------------


def anls_normalize(s: str) -> str:
    """Lower-cased, leading/trailing whitespace stripped, inner whitespace runs collapsed to one space."""
    if not isinstance(s, str):
        raise TypeError(f"anls_normalize: expected str, got {type(s).__name__}")
    return " ".join(s.lower().split())


def normalized_levenshtein(pred: str, gt: str) -> float:
    """NL as the Qwen-VL infographicsvqa script computes it: the edit distance of the NORMALISED strings
    divided by max(len(gt.upper()), len(pred.upper())) of the RAW strings; 0.0 when both are empty.

    So extra whitespace lowers NL: pred "a  b" vs gt "a b" is distance 0; "ab " vs "ac" is 1/3, not 1/2.
    """
    if not isinstance(pred, str) or not isinstance(gt, str):
        raise TypeError(
            f"normalized_levenshtein: pred and gt must be str, got {type(pred).__name__}, {type(gt).__name__}"
        )
    longest = max(len(gt.upper()), len(pred.upper()))
    if longest == 0:
        return 0.0
    return Levenshtein.distance(anls_normalize(gt), anls_normalize(pred)) / longest


def _gt_list(gt: str | Sequence[str], what: str) -> list[str]:
    if isinstance(gt, str):
        return [gt]
    if isinstance(gt, (list, tuple)) and gt and all(isinstance(g, str) for g in gt):
        return list(gt)
    raise TypeError(f"{what}: gt must be a str or a non-empty list of str, got {gt!r}")


def anls_score(pred: str, gt: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one question as the Qwen-VL script scores it: s = 1 - min over its ground truths of NL, and
    0 when s < threshold (so NL exactly 0.5 keeps 0.5 under the benchmark's 0.5).

    Args:
        pred: the predicted answer text (the boxed content; "" when there is none).
        gt: one accepted answer or a non-empty list of them.
        threshold: the lowest similarity kept (0.5 in the benchmark).
    """
    if not isinstance(pred, str):
        raise TypeError(f"anls_score: pred must be str, got {type(pred).__name__}")
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
        raise ValueError(f"anls_score: threshold must be in (0, 1], got {threshold!r}")
    score = 1.0 - min(normalized_levenshtein(pred, g) for g in _gt_list(gt, "anls_score"))
    return score if score >= threshold else 0.0


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
        correct: the verdict of the answer checker named by eval.scoring (answers.py).
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
        solution: the text the "original" scoring read (everything after the prompt, tool results included,
            as the original's rule_reward saw it), so a dump re-scores exactly; None in older dumps.
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
    solution: str | None = None

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
    scoring: str,
    require_boxed: bool = True,
    ended_after_failed_call: bool = False,
) -> tuple[str | None, bool, float]:
    """Scores one response with the answer checker named `scoring` (answers.py), plus ANLS of its boxed answer.

    Args:
        response: the trajectory's text; for "original" the string the original scored
            (Trajectory.solution_text, answers.original_solution).
        gt: accepted answer(s).
        scoring: "original" (correct = the original's rule_reward > 0) or "strict".
        require_boxed: "strict" only.
        ended_after_failed_call: "strict" only: a correct answer right after a failed call counts wrong.
            The original's eval counted the raw rule_reward verdict (its failed-call zeroing lives in the
            training reward only), so "original" ignores it. ANLS ignores it too: the offline ANLS of the
            original read only the answer.

    Returns:
        (boxed answer or None, correct, anls).
    """
    boxed = extract_boxed(response)
    verdict = answers.score(scoring, response, gt, require_boxed=require_boxed)
    correct = verdict.correct and not (scoring == "strict" and ended_after_failed_call)
    return boxed, correct, anls_score(boxed if boxed is not None else "", gt)
