"""Tests for eval/metrics.py (ANLS golden values, scoring, aggregation) and eval/run.py (end-to-end runs).

Expected numbers are worked out by hand in the comments, never taken from the code under test.
"""

import json

import pytest

from pixel_reasoner_jax.eval import metrics as M

# ---------------------------------------------------------------------------------------------------------
# ANLS golden values (the Qwen-VL infographicsvqa script: distance of the normalised strings over the RAW
# strings' max(len(upper())), s = 1 - min NL, s < 0.5 -> 0)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        ("Hello  World", "hello world", 1.0),  # case and inner whitespace normalised: distance 0
        ("2019", "2018", 0.75),  # 1 edit / 4 chars
        (" 2019 ", "2018", 5 / 6),  # 1 edit / 6: the raw prediction's length counts, spaces included
        ("abc", "abd", 2 / 3),  # NL 1/3
        ("kitten", "sitting", 4 / 7),  # k->s, e->i, +g: NL 3/7
        ("sunday", "saturday", 5 / 8),  # +a, +t, n->r: NL 3/8
        ("ab", "ba", 0.0),  # 2 edits (no transposition) / 2
        ("ab", "ac", 0.5),  # NL exactly 0.5: s = 0.5 is not below the threshold, kept
        ("ab ", "ac", 2 / 3),  # 1 edit / raw length 3
        ("aß", "a", 2 / 3),  # 1 edit / len("ASS") = 3: the script measures upper-cased lengths
        ("ab", "cd", 0.0),  # NL 1
        ("", "x", 0.0),  # no answer
        ("", "", 1.0),  # both empty: NL 0
        ("2019", ["two thousand", "2018"], 0.75),  # max over ground truths
        ("2019", ["2018", "2019"], 1.0),
        ("NEW YORK", ["new york city", "New York"], 1.0),
    ],
)
def test_anls_score_golden(pred, gt, expected):
    assert M.anls_score(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_anls_threshold_argument():
    # kitten/sitting: s = 4/7 = 0.571, kept under thresholds 0.4 and 0.5, zero under 0.6.
    assert M.anls_score("kitten", "sitting", threshold=0.4) == pytest.approx(4 / 7)
    assert M.anls_score("kitten", "sitting", threshold=0.5) == pytest.approx(4 / 7)
    assert M.anls_score("kitten", "sitting", threshold=0.6) == 0.0


def test_anls_mean():
    # (0.75 + 2/3) / 2 = 0.708333...
    assert M.anls(["2019", "abc"], ["2018", ["abd"]]) == pytest.approx(0.7083333333333334, abs=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.normalized_levenshtein("a", None), "must be str"),
        (lambda: M.anls_score(None, "a"), "pred must be str"),
        (lambda: M.anls_score("a", []), "non-empty list"),
        (lambda: M.anls_score("a", [1]), "non-empty list"),
        (lambda: M.anls_score("a", "a", threshold=0), "threshold"),
        (lambda: M.anls(["a"], ["a", "b"]), "1 predictions but 2"),
        (lambda: M.anls([], []), "no questions"),
    ],
)
def test_anls_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


@pytest.mark.parametrize(
    "name, canon",
    [
        ("vstar", "vstar"),
        ("VStar", "vstar"),
        ("V*Bench", "vstar"),
        ("V*", "vstar"),
        ("TallyQA", "tallyqa"),
        ("tallyqa_complex", "tallyqa"),
        ("InfoVQA", "infovqa"),
        ("infographicsvqa", "infovqa"),
        ("MVBench", "mvbench"),
        ("synthimage", "synthetic"),
        ("synthvideo", "synthetic"),
        ("ChartQA", "chartqa"),
    ],
)
def test_canonical_benchmark(name, canon):
    assert M.canonical_benchmark(name) == canon


# ---------------------------------------------------------------------------------------------------------
# Per-sample scoring
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["original", "strict"])
def test_score_response(scoring):
    text = "The year on the poster reads 2018. The answer is \\boxed{2018}."
    assert M.score_response(text, "2018", scoring=scoring) == ("2018", True, 1.0)
    # Wrong by one digit: accuracy 0, ANLS 0.75.
    assert M.score_response(text, ["2019"], scoring=scoring) == ("2018", False, 0.75)
    # Letters compare case-free in both.
    assert M.score_response("\\boxed{(B)}", "b", scoring=scoring)[1] is True


def test_score_response_differences():
    # No box: strict finds no answer; the original parses the whole text to 2018. ANLS of "" is 0 in both.
    assert M.score_response("it is 2018", "2018", scoring="strict") == (None, False, 0.0)
    assert M.score_response("it is 2018", "2018", scoring="original") == (None, True, 0.0)
    # A correct answer right after a failed call: strict counts it wrong; the original's eval counted the
    # raw rule_reward verdict. ANLS reads the answer either way.
    text = "\\boxed{2018}"
    assert M.score_response(text, "2018", scoring="strict", ended_after_failed_call=True) == (
        "2018",
        False,
        1.0,
    )
    assert M.score_response(text, "2018", scoring="original", ended_after_failed_call=True) == (
        "2018",
        True,
        1.0,
    )


# ---------------------------------------------------------------------------------------------------------
# Aggregation on hand-made dumps
# ---------------------------------------------------------------------------------------------------------


def _row(qid, bench, correct, anls, calls, failed, status="answered", boxed="x", sample=0, valid=None):
    return {
        "qid": qid,
        "benchmark": bench,
        "question": f"question {qid}",
        "gt": "x",
        "response": f"\\boxed{{{boxed}}}" if boxed is not None else "no answer",
        "boxed": boxed,
        "correct": correct,
        "anls": anls,
        "n_calls": calls,
        "n_failed": failed,
        "n_valid": calls - failed if valid is None else valid,
        "status": status,
        "sample": sample,
    }


HAND_DUMPS = [
    _row("vstar-1", "vstar", True, 1.0, 2, 1),  # used ops, one valid
    _row("vstar-2", "vstar", False, 0.0, 0, 0),  # no ops
    _row(
        "vstar-3", "vstar", False, 0.0, 2, 1, status="max_tool_calls", boxed=None, valid=0
    ),  # failed + unrun
    _row("infovqa-1", "infovqa", False, 0.75, 1, 0),
    _row("infovqa-2", "infovqa", True, 1.0, 0, 0),
]


def test_aggregate_hand_made():
    rep = M.aggregate(HAND_DUMPS)
    assert rep["num_samples"] == 5
    v = rep["benchmarks"]["vstar"]
    # vstar: 1 of 3 correct; 2 of 3 made a call; only vstar-1 had a valid one; calls 2+0+2 = 4 over 3.
    assert v["n"] == 3 and v["n_queries"] == 3
    assert v["accuracy"] == pytest.approx(1 / 3)
    assert v["score"] == pytest.approx(1 / 3) and v["primary"] == "accuracy"
    assert v["anls"] == pytest.approx(1 / 3)
    assert v["rapr"] == pytest.approx(2 / 3)
    assert v["rapr_valid"] == pytest.approx(1 / 3)
    assert v["mean_calls"] == pytest.approx(4 / 3)
    assert v["mean_failed"] == pytest.approx(2 / 3)
    assert v["mean_valid"] == pytest.approx(1 / 3)
    assert v["boxed_rate"] == pytest.approx(2 / 3)
    assert v["accuracy_with_ops"] == pytest.approx(0.5)  # vstar-1 right, vstar-3 wrong
    assert v["accuracy_without_ops"] == pytest.approx(0.0)
    assert v["status"] == {"answered": 2, "max_tool_calls": 1}
    i = rep["benchmarks"]["infovqa"]
    # infovqa reports ANLS: (0.75 + 1) / 2 = 0.875; accuracy 1/2.
    assert i["primary"] == "anls" and i["score"] == pytest.approx(0.875)
    assert i["accuracy"] == pytest.approx(0.5)
    assert i["rapr"] == pytest.approx(0.5) and i["rapr_valid"] == pytest.approx(0.5)
    o = rep["overall"]
    # overall micro: 2/5 correct, 3/5 made calls, 2/5 had a valid call, 2+0+2+1+0 = 5 calls / 5.
    assert o["n"] == 5
    assert o["accuracy"] == pytest.approx(0.4)
    assert o["rapr"] == pytest.approx(0.6)
    assert o["rapr_valid"] == pytest.approx(0.4)
    assert o["mean_calls"] == pytest.approx(1.0)
    assert o["status"] == {"answered": 4, "max_tool_calls": 1}
    assert rep["macro_score"] == pytest.approx((1 / 3 + 0.875) / 2)
    assert not any(k.startswith("pass@") for k in o)
    json.dumps(rep)  # the report is plain JSON


def test_aggregate_pass_at_k():
    rows = [
        _row("vstar-1", "vstar", False, 0.0, 0, 0, sample=0),
        _row("vstar-1", "vstar", True, 1.0, 1, 0, sample=1),
        _row("vstar-2", "vstar", False, 0.0, 0, 0, sample=0),
        _row("vstar-2", "vstar", False, 0.0, 0, 0, sample=1),
    ]
    v = M.aggregate(rows)["benchmarks"]["vstar"]
    # 1 of 4 samples right; 1 of 2 queries has a right sample.
    assert v["accuracy"] == pytest.approx(0.25)
    assert v["n_queries"] == 2
    assert v["pass@2"] == pytest.approx(0.5)


def test_report_markdown():
    md = M.report_markdown(M.aggregate(HAND_DUMPS), title="hand")
    lines = md.splitlines()
    assert lines[0] == "# hand"
    vstar = next(line for line in lines if line.startswith("| vstar "))
    cells = [c.strip() for c in vstar.strip("|").split("|")]
    # benchmark, n, score, accuracy, ANLS, RaPR, RaPR (valid), calls, failed, boxed, status
    assert cells == [
        "vstar",
        "3",
        "33.3 (acc)",
        "33.3",
        "33.3",
        "66.7",
        "33.3",
        "1.33",
        "0.67",
        "66.7",
        "answered 2, max_tool_calls 1",
    ]
    info = next(line for line in lines if line.startswith("| infovqa "))
    assert "| 87.5 (ANLS) | 50.0 | 87.5 |" in info
    assert any(line.startswith("| overall (micro) | 5 | 40.0 (acc)") for line in lines)
    assert "Macro score (mean of the benchmark scores): 60.4" in md  # (33.33 + 87.5) / 2 = 60.42


def test_dump_round_trip_and_bad_lines(tmp_path):
    results = [M.SampleResult.from_json(r) for r in HAND_DUMPS]
    path = tmp_path / "dump.jsonl"
    M.write_dumps(path, results)
    assert M.read_dumps(path) == results
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(ValueError, match=r"dump.jsonl:6: not a dump row"):
        M.read_dumps(path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"n_failed": 2}, "n_valid 1 \\+ n_failed 2 exceeds n_calls 2"),
        ({"n_calls": -1}, "n_calls must be an int >= 0"),
        ({"correct": 1}, "correct must be bool"),
        ({"anls": 1.5}, "anls must be a number in"),
        ({"gt": []}, "non-empty list"),
    ],
)
def test_sample_result_validation(change, match):
    with pytest.raises((TypeError, ValueError), match=match):
        M.SampleResult.from_json({**HAND_DUMPS[0], **change})


def test_bad_aggregate_input():
    with pytest.raises(ValueError, match="no samples"):
        M.aggregate([])
    with pytest.raises(ValueError, match="lacks keys"):
        M.aggregate([{"qid": "a"}])
    with pytest.raises(ValueError, match="lacks 'benchmarks'"):
        M.report_markdown({})
