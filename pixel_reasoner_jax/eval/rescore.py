"""Re-scores saved responses with the answer checker (answers.py) and ANLS, line for line; never regenerates.

  python -m pixel_reasoner_jax.eval.rescore --input FILE --output FILE [--scoring original|strict]

Input: JSONL rows {"qid", "response", "answer"} or an eval dump (samples.jsonl: qid, response, gt). Output:
each row with `correct` (0/1), `benchmark` and `anls` added (replacing earlier values), or {"error": ...}
for a malformed line, so line k of the output is line k of the input; a per-benchmark table on stdout.
"""

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from pixel_reasoner_jax import answers
from pixel_reasoner_jax.eval import metrics as em
from pixel_reasoner_jax.metrics import progress


class BadRow(ValueError):
    """A line that cannot be scored; it is written as {"error": ...} and the run goes on."""


def _field(row: dict, key: str) -> Any:
    if key not in row:
        raise BadRow(f"missing key {key!r}; expected qid, response and answer (or gt)")
    return row[key]


def parse_row(line: str) -> tuple[dict, str, str, str | list[str]]:
    """(row, qid, response, gt) of one input line.

    Raises:
      BadRow: not a JSON object, or qid/response/answer missing or of the wrong type.
    """
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRow(f"not JSON ({e})") from e
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    qid, response = _field(row, "qid"), _field(row, "response")
    gt = row["answer"] if "answer" in row else _field(row, "gt")
    if not isinstance(qid, str) or not qid:
        raise BadRow(f"qid must be a non-empty string, got {qid!r}")
    if not isinstance(response, str):
        raise BadRow(f"response must be a string, got {type(response).__name__}")
    if not (isinstance(gt, str) or (isinstance(gt, list) and gt and all(isinstance(g, str) for g in gt))):
        raise BadRow(f"answer must be a string or a non-empty list of strings, got {gt!r}")
    return row, qid, response, gt


def benchmark_of(qid: str) -> str:
    """The canonical benchmark of a qid: its part before the first "-" (e.g. "vstar-12" -> "vstar")."""
    return em.canonical_benchmark(qid.split("-", 1)[0] or qid)


@dataclasses.dataclass
class RescoreReport:
    """Per-benchmark sums of one run; `bad` lists (line number, reason)."""

    scoring: str
    n: dict[str, int] = dataclasses.field(default_factory=dict)
    correct: dict[str, int] = dataclasses.field(default_factory=dict)
    anls: dict[str, float] = dataclasses.field(default_factory=dict)
    bad: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def add(self, benchmark: str, correct: bool, anls: float) -> None:
        self.n[benchmark] = self.n.get(benchmark, 0) + 1
        self.correct[benchmark] = self.correct.get(benchmark, 0) + int(correct)
        self.anls[benchmark] = self.anls.get(benchmark, 0.0) + anls

    def table(self) -> str:
        """Markdown: per benchmark n, accuracy, ANLS and the reported score (ANLS for infovqa), then all."""
        lines = [
            f"scoring: {self.scoring}",
            "| benchmark | n | accuracy | ANLS | score |",
            "|---|---|---|---|---|",
        ]
        names = sorted(self.n)
        for name in [*names, "all"]:
            keys = names if name == "all" else [name]
            n = sum(self.n[k] for k in keys)
            if n == 0:
                continue
            acc = sum(self.correct[k] for k in keys) / n
            anls = sum(self.anls[k] for k in keys) / n
            score = f"{100 * anls:.1f} (ANLS)" if name in em.ANLS_BENCHMARKS else f"{100 * acc:.1f} (acc)"
            score = "" if name == "all" else score
            lines.append(f"| {name} | {n} | {100 * acc:.1f} | {100 * anls:.1f} | {score} |")
        if self.bad:
            lines.append(f"\n{len(self.bad)} malformed lines written as errors")
        return "\n".join(lines)


def rescore_file(
    input_path: str,
    output_path: str,
    *,
    scoring: str = "original",
    require_boxed: bool = True,
    log=None,
    show_progress: bool = True,
) -> RescoreReport:
    """Scores every line of `input_path` into `output_path`, line for line.

    A response is scored as it stands, except that "original" reads an eval dump's `solution` (the
    conversation after the prompt, tool results included, as the original scored it) where the row has one;
    `response` holds the assistant turns only.

    Args:
      scoring: a key of answers.SCORINGS.
      require_boxed: "strict" only.
      log: stream for malformed-line messages and the progress bar (stderr by default).
    """
    if scoring not in answers.SCORINGS:
        raise ValueError(f"scoring must be one of {sorted(answers.SCORINGS)}, got {scoring!r}")
    log = sys.stderr if log is None else log
    with open(input_path, encoding="utf-8") as f:
        total = sum(1 for _ in f)
    report = RescoreReport(scoring)
    bar = progress(total, desc="rescore", enabled=show_progress, file=log)
    tmp = f"{output_path}.tmp"
    with open(input_path, encoding="utf-8") as fin, open(tmp, "w", encoding="utf-8") as fout:
        for n, line in enumerate(fin, start=1):
            try:
                row, qid, response, gt = parse_row(line)
            except BadRow as e:
                report.bad.append((n, str(e)))
                print(f"line {n}: {e}", file=log)
                fout.write(json.dumps({"error": f"line {n}: {e}"}) + "\n")
            else:
                text = row.get("solution") if scoring == "original" else None
                _, correct, anls = em.score_response(
                    text if isinstance(text, str) else response,
                    gt,
                    scoring=scoring,
                    require_boxed=require_boxed,
                )
                bench = benchmark_of(qid)
                report.add(bench, correct, anls)
                out = {**row, "correct": int(correct), "benchmark": bench, "anls": anls}
                fout.write(json.dumps(out, ensure_ascii=False) + "\n")
            bar.update(1)
    bar.close()
    os.replace(tmp, output_path)  # a reader never sees a half-written file
    return report


def main(argv: Sequence[str] | None = None) -> RescoreReport:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", required=True, help="JSONL: {qid, response, answer} or an eval samples.jsonl"
    )
    parser.add_argument("--output", required=True, help="JSONL written line for line")
    parser.add_argument("--scoring", default="original", choices=sorted(answers.SCORINGS))
    parser.add_argument(
        "--no-require-boxed",
        action="store_true",
        help="strict only: fall back to <answer>/Answer: without a box",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input!r} is not a file")
    report = rescore_file(
        args.input,
        args.output,
        scoring=args.scoring,
        require_boxed=not args.no_require_boxed,
        show_progress=not args.no_progress,
    )
    print(report.table())
    return report


if __name__ == "__main__":
    main()
