"""Tests for eval/rescore.py: line-for-line output, malformed lines, both scorings and the per-benchmark table.

Expected values are worked out by hand in the comments.
"""

import json

import pytest

from pixel_reasoner_jax.eval import rescore

ROWS = [
    {"qid": "vstar-1", "response": "\\boxed{B}", "answer": "B"},
    # No box: the original reads the whole text (3); strict finds no answer. ANLS of "" vs "3" is 0.
    {"qid": "tallyqa-7", "response": "There are 3 dogs.", "answer": "3"},
    "this line is not JSON",
    # An eval dump row: gt instead of answer; its old correct/benchmark are replaced. 2019 vs 2018:
    # wrong, ANLS 1 - 1/4 = 0.75.
    {"qid": "InfoVQA-2", "response": "\\boxed{2019}", "gt": ["2018"], "correct": True, "benchmark": "x"},
    {"qid": "mvbench-3", "response": 5, "answer": "A"},
    {"qid": "mvbench-4", "response": "\\boxed{A}"},
]


def _write(path):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in ROWS))


@pytest.mark.parametrize("scoring, tally_correct", [("original", 1), ("strict", 0)])
def test_rescore_file(tmp_path, capsys, scoring, tally_correct):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src)
    report = rescore.main(["--input", str(src), "--output", str(dst), "--scoring", scoring, "--no-progress"])
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(out) == len(ROWS)  # line k of the output is line k of the input
    assert out[0] == {**ROWS[0], "correct": 1, "benchmark": "vstar", "anls": 1.0}
    assert out[1] == {**ROWS[1], "correct": tally_correct, "benchmark": "tallyqa", "anls": 0.0}
    assert out[2]["error"].startswith("line 3: not JSON")
    assert out[3] == {**ROWS[3], "correct": 0, "benchmark": "infovqa", "anls": 0.75}
    assert out[4] == {"error": "line 5: response must be a string, got int"}
    assert out[5]["error"].startswith("line 6: missing key 'gt'")
    assert [n for n, _ in report.bad] == [3, 5, 6]
    captured = capsys.readouterr()
    assert "line 5: response must be a string" in captured.err
    # vstar 1/1, tallyqa tally_correct/1 (ANLS 0), infovqa 0/1 (ANLS 0.75, its reported score); all 3 rows.
    table = captured.out
    assert "| vstar | 1 | 100.0 | 100.0 | 100.0 (acc) |" in table
    assert f"| tallyqa | 1 | {100.0 * tally_correct:.1f} | 0.0 | {100.0 * tally_correct:.1f} (acc) |" in table
    assert "| infovqa | 1 | 0.0 | 75.0 | 75.0 (ANLS) |" in table
    assert f"| all | 3 | {100 * (1 + tally_correct) / 3:.1f} | 58.3 |  |" in table
    assert "3 malformed lines" in table


def test_benchmark_of():
    assert rescore.benchmark_of("VStar-12") == "vstar"
    assert rescore.benchmark_of("infographicsvqa-3-a") == "infovqa"
    assert rescore.benchmark_of("toy") == "toy"


def test_rescore_rejects_an_unknown_scoring(tmp_path):
    src = tmp_path / "in.jsonl"
    _write(src)
    with pytest.raises(ValueError, match="scoring must be one of"):
        rescore.rescore_file(str(src), str(tmp_path / "out.jsonl"), scoring="exact")
