"""Eval reports: per-benchmark and per-category aggregation of per-sample rows (accuracy, ANLS, RaPR, tool use,
crop faithfulness, statuses), the paper's numbers beside ours, markdown tables, and the per-sample dump I/O.

Host-side Python only; rows are eval/metrics.SampleResult objects or their JSON lines.
"""

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pixel_reasoner_jax.eval.metrics import ANLS_BENCHMARKS, SampleResult
from pixel_reasoner_jax.rollout.faithfulness import MIN_COVERAGE, faithfulness_summary

MEDIA_ERROR = "media_error"  # status of a sample whose record's media could not be read (not scored)
# The paper's numbers (percent): model -> benchmark -> (value, source, verified). Sources:
# reference/pixel_reasoner.md §11 and reference/benchmarks.md §6. Unverified numbers are shown with a dagger.
PAPER: dict[str, dict[str, tuple[float, str, bool]]] = {
    "PixelReasoner-RL-v1": {
        "vstar": (84.3, "verl-tool README table; Pixel-Reasoner issue #33", True),
        "tallyqa": (73.8, "paper table as recalled; abstract says 74%", False),
        "infovqa": (84.0, "paper table as recalled (ANLS, issue #6); abstract says 84%", False),
        "mvbench": (67.8, "paper table as recalled", False),
    },
    "PixelReasoner-WarmStart": {"vstar": (79.0, "paper, as quoted in Pixel-Reasoner issue #32", True)},
    "Qwen2.5-VL-7B-Instruct": {"vstar": (70.4, "paper baseline row as recalled", False)},
}
DEFAULT_PAPER_MODEL = "PixelReasoner-RL-v1"


def paper_model_for(checkpoint: str | None) -> str:
    """The PAPER row to compare a checkpoint with, from its folder name (RL-v1 unless it names another)."""
    name = (checkpoint or "").lower().replace("_", "-")
    if "warmstart" in name or "warm-start" in name:
        return "PixelReasoner-WarmStart"
    if "qwen2.5-vl" in name or "qwen25vl" in name:
        return "Qwen2.5-VL-7B-Instruct"
    return DEFAULT_PAPER_MODEL


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


def _mean(values: Sequence) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(rows: list[SampleResult], primary: str) -> dict[str, Any]:
    """Metrics of the scored rows of one group (rows whose media failed are counted, not scored)."""
    failed = [r for r in rows if r.status == MEDIA_ERROR]
    rows = [r for r in rows if r.status != MEDIA_ERROR]
    by_qid: dict[str, list[SampleResult]] = {}
    for r in rows:
        by_qid.setdefault(r.qid, []).append(r)
    executed = sum(r.n_valid + r.n_failed for r in rows)
    out = {
        "n": len(rows),
        "n_queries": len(by_qid),
        "n_media_errors": len(failed),
        "primary": primary,
        "accuracy": _mean([r.correct for r in rows]),
        "anls": _mean([r.anls for r in rows]),
        # RaPR: >= 1 visual-operation call (the original's `round0_nwait > 0`); valid: >= 1 that succeeded.
        "rapr": _mean([r.n_calls > 0 for r in rows]),
        "rapr_valid": _mean([r.n_valid > 0 for r in rows]),
        "mean_calls": _mean([r.n_calls for r in rows]),
        "mean_failed": _mean([r.n_failed for r in rows]),
        "mean_valid": _mean([r.n_valid for r in rows]),
        "tool_error_rate": sum(r.n_failed for r in rows) / executed if executed else None,
        "extra_keys": sum(r.n_extra_keys for r in rows),
        "responses_with_extra_keys": sum(r.n_extra_keys > 0 for r in rows),
        "boxed_rate": _mean([r.boxed is not None for r in rows]),
        "mean_tokens": _mean([r.n_tokens for r in rows]),
        # Accuracy among responses that did / did not use a visual operation (None when there are none).
        "accuracy_with_ops": _mean([r.correct for r in rows if r.n_calls > 0]),
        "accuracy_without_ops": _mean([r.correct for r in rows if r.n_calls == 0]),
        "faithfulness": faithfulness_summary([r.faithful for r in rows], [r.correct for r in rows]),
        "status": dict(sorted(Counter(r.status for r in rows).items())),
    }
    out["score"] = out[primary]
    k = max((len(v) for v in by_qid.values()), default=0)
    if k > 1:  # several samples per query: pass@k over the queries (k = the most samples any query has)
        out[f"pass@{k}"] = sum(any(r.correct for r in v) for v in by_qid.values()) / len(by_qid)
    return out


def aggregate(samples: Iterable[SampleResult | Mapping[str, Any]]) -> dict[str, Any]:
    """The eval report of a set of per-sample results.

    Per benchmark (and "overall", a micro-average over every sample), see `_summary`: n, n_queries,
    n_media_errors, accuracy (rule reward), anls, score (ANLS for infovqa, accuracy otherwise: what the paper
    reports), rapr, rapr_valid, mean calls / failed / valid, tool_error_rate (failed / executed calls),
    extra_keys, boxed_rate, mean_tokens, accuracy_with_ops / _without_ops, faithfulness, status counts and
    pass@k when a query has k > 1 samples; `categories` holds the same per record category. `macro_score` is
    the mean of the benchmarks' scores.

    Raises:
        ValueError: no samples.
    """
    rows = _as_results(samples)
    if not rows:
        raise ValueError("aggregate: no samples; expected at least one result")
    groups: dict[str, list[SampleResult]] = {}
    for r in rows:
        groups.setdefault(r.benchmark, []).append(r)
    benchmarks = {}
    for name, group in sorted(groups.items()):
        primary = "anls" if name in ANLS_BENCHMARKS else "accuracy"
        summary = _summary(group, primary)
        cats: dict[str, list[SampleResult]] = {}
        for r in group:
            if r.category is not None:
                cats.setdefault(r.category, []).append(r)
        summary["categories"] = {c: _summary(g, primary) for c, g in sorted(cats.items())}
        benchmarks[name] = summary
    scores = [b["score"] for b in benchmarks.values() if b["score"] is not None]
    return {
        "num_samples": len(rows),
        "benchmarks": benchmarks,
        "overall": _summary(rows, "accuracy"),
        "macro_score": _mean(scores),
        "faithfulness_definition": (
            f"a crop contains the target when, mapped to original-image coordinates, it covers >= "
            f"{MIN_COVERAGE:.0%} of the target box (rollout/faithfulness.py)"
        ),
    }


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def report_markdown(
    report: Mapping[str, Any], title: str = "Evaluation", paper_model: str | None = None
) -> str:
    """Markdown of a report from `aggregate`: the benchmark table with the paper's numbers beside ours, the
    per-category table, and notes (percentages with one decimal; mean counts with two).

    Args:
        report: the dict from `aggregate`.
        title: the heading.
        paper_model: the PAPER row to compare with (default RL-v1).
    """
    for key in ("benchmarks", "overall", "macro_score"):
        if key not in report:
            raise ValueError(f"report_markdown: report lacks {key!r}; expected the dict from aggregate()")
    paper_model = paper_model or DEFAULT_PAPER_MODEL
    if paper_model not in PAPER:
        raise ValueError(f"report_markdown: paper_model {paper_model!r} is not one of {sorted(PAPER)}")
    paper = PAPER[paper_model]
    head = (
        "| benchmark | n | score | paper | Δ | accuracy | ANLS | RaPR | RaPR (valid) | calls | tool errors | "
        "extra keys | crops with target | correct saw target | status |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [f"# {title}", "", f"Paper numbers: {paper_model} († = unverified).", "", head]
    rows = [*report["benchmarks"].items(), ("overall (micro)", report["overall"])]
    for name, b in rows:
        status = ", ".join(f"{k} {v}" for k, v in b["status"].items())
        if b["n_media_errors"]:
            status += f"; {b['n_media_errors']} media errors (not scored)"
        score = f"{_pct(b['score'])} ({'ANLS' if b['primary'] == 'anls' else 'acc'})"
        ref, delta = "–", "–"
        if name in paper:
            value, _, verified = paper[name]
            ref = f"{value:.1f}" + ("" if verified else "†")
            delta = "–" if b["score"] is None else f"{100 * b['score'] - value:+.1f}"
        f = b["faithfulness"]
        lines.append(
            f"| {name} | {b['n']} | {score} | {ref} | {delta} | {_pct(b['accuracy'])} | {_pct(b['anls'])} | "
            f"{_pct(b['rapr'])} | {_pct(b['rapr_valid'])} | {_num(b['mean_calls'])} | "
            f"{_pct(b['tool_error_rate'])} | {b['extra_keys']} | {_pct(f['crop_hit_rate'])} | "
            f"{_pct(f['correct_saw_target'])} | {status} |"
        )
    lines += ["", f"Macro score (mean of the benchmark scores): {_pct(report['macro_score'])}"]
    cat_rows = [
        (n, c, s) for n, b in report["benchmarks"].items() for c, s in b.get("categories", {}).items()
    ]
    if cat_rows:
        lines += [
            "",
            "## Per category",
            "",
            "| benchmark | category | n | score | accuracy | RaPR | calls | crops with target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, c, s in cat_rows:
            lines.append(
                f"| {n} | {c} | {s['n']} | {_pct(s['score'])} | {_pct(s['accuracy'])} | {_pct(s['rapr'])} | "
                f"{_num(s['mean_calls'])} | {_pct(s['faithfulness']['crop_hit_rate'])} |"
            )
    lines += [
        "",
        "score: ANLS for infovqa (the paper's number), rule-reward accuracy otherwise. RaPR: share of responses "
        "with >= 1 visual-operation call (the original's `round0_nwait > 0`); RaPR (valid): >= 1 successful call. "
        "calls: mean per response. tool errors: failed / executed calls. extra keys: tool-call keys no tool "
        "reads (ignored, as the original did). crops with target: share of executed crops that contain the "
        "record's target box; correct saw target: among correct responses with a crop, the share whose crops "
        f"contain every target box (CodeV measured 43% for Pixel-Reasoner on V*). {report.get('faithfulness_definition', '')}.",
        "",
        "Sources of the paper numbers:",
        *(f"- {b}: {v:.1f} — {src}" + ("" if ok else " (unverified)") for b, (v, src, ok) in paper.items()),
    ]
    passes = [(n, k, v) for n, b in rows for k, v in b.items() if k.startswith("pass@")]
    if passes:
        lines += ["", *(f"- {n} {k}: {_pct(v)}" for n, k, v in passes)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Dump I/O
# ---------------------------------------------------------------------------------------------------------


def _line(s: SampleResult) -> str:
    return json.dumps(s.to_json(), ensure_ascii=False) + "\n"


def write_dumps(path: str | os.PathLike, samples: Iterable[SampleResult]) -> None:
    """Writes one JSON line per sample (ensure_ascii off: questions and answers stay readable), atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(_line(s) for s in samples)
    os.replace(tmp, path)  # a reader never sees a half-written dump


def append_dumps(path: str | os.PathLike, samples: Iterable[SampleResult]) -> None:
    """Appends rows and syncs them to disk, so a kill after this call loses none of them."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(_line(s) for s in samples)
        f.flush()
        os.fsync(f.fileno())


def read_dumps(path: str | os.PathLike, *, tail: str = "error") -> list[SampleResult]:
    """Reads a dump written by `write_dumps` / `append_dumps`.

    Args:
        path: the JSONL file.
        tail: what to do with an unterminated last line, the only line a kill in the middle of an append
            can break: "error" (treat it as any bad line), "cut" (truncate it from the file, so that appends
            continue on a clean line; its sample simply runs again) or "skip" (ignore it: another process may
            still be writing it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a (terminated) line that is not JSON or not a valid dump row (the message names it).
    """
    if tail not in ("error", "cut", "skip"):
        raise ValueError(f"read_dumps: tail must be 'error', 'cut' or 'skip', got {tail!r}")
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep != len(data) and tail != "error":
        if tail == "cut":
            with open(path, "rb+") as f:
                f.truncate(keep)
        data = data[:keep]
    out = []
    # split on "\n" only: str.splitlines would also split on U+2028 etc., which JSON leaves unescaped
    for lineno, line in enumerate(data.decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append(SampleResult.from_json(json.loads(line)))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: not a dump row: {e}") from e
    return out
