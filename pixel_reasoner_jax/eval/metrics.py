"""Evaluation metrics: ANLS (the Qwen-VL script's, on rapidfuzz), per-sample scoring (answers.py), per-benchmark
aggregation (accuracy, ANLS, RaPR, tool calls, statuses), per-sample dump I/O and the report (dict, markdown).

Host-side Python only. Definitions follow reference/benchmarks.md §3 and reference/pixel_reasoner.md §10.
"""

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rapidfuzz.distance import Levenshtein

from pixel_reasoner_jax import answers
from pixel_reasoner_jax.answers import extract_boxed

ANLS_THRESHOLD = 0.5
# Benchmarks whose reported number is ANLS (the author computed it offline from the dumps, issue #6); the
# others report rule-reward accuracy.
ANLS_BENCHMARKS = frozenset({"infovqa"})
# qid prefixes seen in the wild -> the config's benchmark names (config.BENCHMARKS). The eval parquets name
# the benchmark by the qid's part before "-", whose exact spelling is not documented, so several are accepted.
_BENCHMARK_PREFIXES = (
    ("vstar", "vstar"),
    ("tallyqa", "tallyqa"),
    ("infographic", "infovqa"),
    ("infovqa", "infovqa"),
    ("mvbench", "mvbench"),
    ("synth", "synthetic"),
)


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


def canonical_benchmark(name: str) -> str:
    """The config's benchmark name for a record's benchmark (its qid prefix).

    "VStar" / "V*Bench" -> "vstar", "InfoVQA" / "InfographicsVQA" -> "infovqa", "synthimage" -> "synthetic";
    an unknown name comes back lower-cased with only [a-z0-9] kept (so the caller can report it).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"canonical_benchmark: expected a non-empty str, got {name!r}")
    clean = re.sub(r"[^a-z0-9]", "", name.lower().replace("*", "star"))  # "V*" is V* Bench
    for prefix, canon in _BENCHMARK_PREFIXES:
        if clean.startswith(prefix):
            return canon
    return clean or name.lower()


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
        for name in ("n_calls", "n_failed", "n_valid", "sample", "n_tokens"):
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
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
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


# ---------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------


def _as_results(samples: Iterable[SampleResult | Mapping[str, Any]]) -> list[SampleResult]:
    out = []
    for s in samples:
        if isinstance(s, SampleResult):
            out.append(s)
        elif isinstance(s, Mapping):
            out.append(SampleResult.from_json(s))
        else:
            raise TypeError(f"samples must be SampleResult or dump rows (dicts), got {type(s).__name__}")
    return out


def _summary(rows: list[SampleResult], primary: str) -> dict[str, Any]:
    n = len(rows)
    by_qid: dict[str, list[SampleResult]] = {}
    for r in rows:
        by_qid.setdefault(r.qid, []).append(r)
    out = {
        "n": n,
        "n_queries": len(by_qid),
        "accuracy": sum(r.correct for r in rows) / n,
        "anls": sum(r.anls for r in rows) / n,
        "primary": primary,
        "rapr": sum(r.n_calls > 0 for r in rows) / n,
        "rapr_valid": sum(r.n_valid > 0 for r in rows) / n,
        "mean_calls": sum(r.n_calls for r in rows) / n,
        "mean_failed": sum(r.n_failed for r in rows) / n,
        "mean_valid": sum(r.n_valid for r in rows) / n,
        "boxed_rate": sum(r.boxed is not None for r in rows) / n,
        "mean_tokens": sum(r.n_tokens for r in rows) / n,
        # Accuracy among responses that did / did not use a visual operation (None when there are none).
        "accuracy_with_ops": _mean([r.correct for r in rows if r.n_calls > 0]),
        "accuracy_without_ops": _mean([r.correct for r in rows if r.n_calls == 0]),
        "status": dict(sorted(Counter(r.status for r in rows).items())),
    }
    out["score"] = out[primary]
    k = max(len(v) for v in by_qid.values())
    if k > 1:  # several samples per query: pass@k over the queries (k = the most samples any query has)
        out[f"pass@{k}"] = sum(any(r.correct for r in v) for v in by_qid.values()) / len(by_qid)
    return out


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(samples: Iterable[SampleResult | Mapping[str, Any]]) -> dict[str, Any]:
    """The eval report of a set of per-sample results.

    Per benchmark (and "overall", a micro-average over every sample): n, n_queries, accuracy (rule reward),
    anls, score (ANLS for infovqa, accuracy otherwise: what the paper reports), rapr (share of responses with
    >= 1 tool call, the original's `round0_nwait > 0`), rapr_valid (>= 1 successful call, verl-tool's
    count), mean_calls, mean_failed, mean_valid, boxed_rate, mean_tokens, accuracy_with_ops / _without_ops, status counts,
    and pass@k when a query has k > 1 samples. `macro_score` is the mean of the benchmarks' scores.

    Args:
        samples: SampleResult objects or dump rows.

    Raises:
        ValueError: no samples.
    """
    rows = _as_results(samples)
    if not rows:
        raise ValueError("aggregate: no samples; expected at least one result")
    groups: dict[str, list[SampleResult]] = {}
    for r in rows:
        groups.setdefault(r.benchmark, []).append(r)
    benchmarks = {
        name: _summary(group, "anls" if name in ANLS_BENCHMARKS else "accuracy")
        for name, group in sorted(groups.items())
    }
    return {
        "num_samples": len(rows),
        "benchmarks": benchmarks,
        "overall": _summary(rows, "accuracy"),
        "macro_score": sum(b["score"] for b in benchmarks.values()) / len(benchmarks),
    }


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def report_markdown(report: Mapping[str, Any], title: str = "Evaluation") -> str:
    """A markdown table of a report from `aggregate` (percentages with one decimal; mean counts with two)."""
    for key in ("benchmarks", "overall", "macro_score"):
        if key not in report:
            raise ValueError(f"report_markdown: report lacks {key!r}; expected the dict from aggregate()")
    head = (
        "| benchmark | n | score | accuracy | ANLS | RaPR | RaPR (valid) | calls | failed | boxed | status |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [f"# {title}", "", head]
    rows = [*report["benchmarks"].items(), ("overall (micro)", report["overall"])]
    for name, b in rows:
        status = ", ".join(f"{k} {v}" for k, v in b["status"].items())
        score = f"{_pct(b['score'])} ({'ANLS' if b['primary'] == 'anls' else 'acc'})"
        lines.append(
            f"| {name} | {b['n']} | {score} | {_pct(b['accuracy'])} | {_pct(b['anls'])} | {_pct(b['rapr'])} | "
            f"{_pct(b['rapr_valid'])} | {b['mean_calls']:.2f} | {b['mean_failed']:.2f} | "
            f"{_pct(b['boxed_rate'])} | {status} |"
        )
    lines += [
        "",
        f"Macro score (mean of the benchmark scores): {_pct(report['macro_score'])}",
        "",
        "score: ANLS for infovqa, rule-reward accuracy otherwise. RaPR: share of responses with >= 1 tool "
        "call; RaPR (valid): >= 1 successful call. calls / failed: mean per response. boxed: share with a "
        "\\boxed{} answer.",
    ]
    passes = [(n, k, v) for n, b in rows for k, v in b.items() if k.startswith("pass@")]
    if passes:
        lines += ["", *(f"- {n} {k}: {_pct(v)}" for n, k, v in passes)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Dump I/O
# ---------------------------------------------------------------------------------------------------------


def write_dumps(path: str | os.PathLike, samples: Iterable[SampleResult]) -> None:
    """Writes one JSON line per sample (ensure_ascii off: questions and answers stay readable)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written dump


def read_dumps(path: str | os.PathLike) -> list[SampleResult]:
    """Reads a dump written by `write_dumps`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON or not a valid dump row (the message names the line).
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(SampleResult.from_json(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a dump row: {e}") from e
    return out
