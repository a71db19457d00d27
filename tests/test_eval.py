"""Tests for eval/metrics.py: ANLS golden values, benchmark names and per-sample scoring (reports: test_eval_report.py).

Expected numbers are worked out by hand in the comments, never taken from the code under test.
"""

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
