"""Tests for eval/metrics.py: ANLS golden values, benchmark names and per-sample scoring (reports: test_eval_report.py).

Expected numbers are worked out by hand in the comments, never taken from the code under test.
"""

import pytest

from pixel_reasoner_jax.eval import metrics as M

# ---------------------------------------------------------------------------------------------------------
# Levenshtein and ANLS golden values
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, d",
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("sitting", "kitten", 3),  # symmetric
        ("flaw", "lawn", 2),  # -f, +n
        ("intention", "execution", 5),  # textbook example
        ("sunday", "saturday", 3),  # +a, +t, n->r
        ("ab", "ba", 2),  # no transposition operation
        ("", "abc", 3),
        ("abc", "", 3),
        ("", "", 0),
        ("same", "same", 0),
    ],
)
def test_levenshtein_golden(a, b, d):
    assert M.levenshtein(a, b) == d


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        ("Hello  World", "hello world", 1.0),  # case and inner whitespace normalised
        (" 2019 ", "2018", 0.75),  # 1 edit / 4 chars -> NL 0.25
        ("abc", "abd", 2 / 3),  # NL 1/3
        ("kitten", "sitting", 4 / 7),  # NL 3/7 = 0.43 < 0.5
        ("ab", "ac", 0.0),  # NL exactly 0.5 is NOT below the threshold
        ("ab", "cd", 0.0),  # NL 1
        ("", "x", 0.0),  # no answer
        ("", "", 1.0),  # both empty: NL 0
        ("a  b", "a b", 1.0),  # lengths are those of the normalised strings
        ("2019", ["two thousand", "2018"], 0.75),  # max over ground truths
        ("2019", ["2018", "2019"], 1.0),
        ("NEW YORK", ["new york city", "New York"], 1.0),
    ],
)
def test_anls_score_golden(pred, gt, expected):
    assert M.anls_score(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_anls_threshold_argument():
    # kitten/sitting: NL 3/7 = 0.4286, scored under tau 0.5, zero under tau 0.4.
    assert M.anls_score("kitten", "sitting", threshold=0.4) == 0.0
    assert M.anls_score("kitten", "sitting", threshold=0.5) == pytest.approx(4 / 7)


def test_anls_mean():
    # (0.75 + 2/3) / 2 = 0.708333...
    assert M.anls(["2019", "abc"], ["2018", ["abd"]]) == pytest.approx(0.7083333333333334, abs=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.levenshtein("a", None), "must be str"),
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


def test_score_response():
    text = "The year on the poster reads 2018. The answer is \\boxed{2018}."
    assert M.score_response(text, "2018") == ("2018", True, 1.0)
    # Wrong by one digit: accuracy 0, ANLS 0.75.
    assert M.score_response(text, ["2019"]) == ("2018", False, 0.75)
    # No box: no answer, ANLS of "" is 0.
    assert M.score_response("it is 2018", "2018") == (None, False, 0.0)
    # A correct answer right after a failed call scores 0 in the rule reward, but ANLS reads the answer.
    assert M.score_response(text, "2018", ended_after_failed_call=True) == ("2018", False, 1.0)
    # Letters compare case-free through the rule reward.
    assert M.score_response("\\boxed{(B)}", "b")[1] is True
