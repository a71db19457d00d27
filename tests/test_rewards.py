"""Tests for train/rewards.py: boxed extraction, answer matching table, accuracy, RaPR, both shaping forms.

Expected values are worked out by hand in the comments, never taken from the code under test.
"""

import numpy as np
import pytest

from pixel_reasoner_jax.train import rewards as R

# ---------------------------------------------------------------------------------------------------------
# extract_boxed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}.", "5"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the LAST box
        ("\\boxed{a{b{c}}d} tail", "a{b{c}}d"),  # nested braces balanced
        ("\\boxed{\\text{(B)}}", "\\text{(B)}"),
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{1} and a truncated \\boxed{2", None),  # last box unclosed -> no answer
    ],
)
def test_extract_boxed(text, expected):
    assert R.extract_boxed(text) == expected


def test_extract_boxed_rejects_non_str():
    with pytest.raises(TypeError, match="text must be str"):
        R.extract_boxed(None)


# ---------------------------------------------------------------------------------------------------------
# answer_matches: a table of 40 cases
# ---------------------------------------------------------------------------------------------------------

ANSWER_TABLE = [
    ("5", "5", True),
    ("5.0", "5", True),  # numbers
    ("three", "3", True),  # number words
    ("3", "Three", True),
    ("2", "two", True),
    ("  Paris ", "paris", True),  # case + whitespace
    ("\\text{Paris}", "Paris", True),  # \text{} unwrapped
    ("\\textbf{\\text{Yes}}", "yes", True),  # nested wrappers
    ("Paris.", "paris", True),  # trailing period
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),  # dfrac -> frac
    ("\\frac{1}{2}", "0.5", True),  # 1/2 = 0.5
    ("1/2", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("5 cm", "5", True),  # units
    ("12 minutes", "12", True),
    ("\\text{7 cm}", "7", True),
    ("45", "45%", True),  # percentages
    ("45\\%", "45%", True),
    ("45%", "45", True),
    ("B", "B", True),  # letters
    ("(B)", "B", True),
    ("B.", "B", True),
    ("B: the red car", "B", True),
    ("b) red", "(B)", True),
    ("\\text{(C)}", "C", True),
    ("C", "B", False),
    ("a cat", "A", False),  # a word starting with a letter is not a choice
    ("bat", "B", False),
    ("4", ["3", "4"], True),  # list of accepted answers
    ("5", ["3", "4"], False),
    ("red, blue", "blue, red", True),  # multi-span, order-free
    ("the red one and a blue one", "red, blue", True),
    ("red only", "red, blue", False),
    ("12, 3", "1, 2", False),  # "1" is not inside "12" (whole-token spans)
    ("1000", "1,000", True),  # thousands separator
    ("x + 1", "x+1", True),  # spaces inside expressions
    ("3.14", "3.14159", False),
    ("$10$", "10", True),
    ("\\varnothing", "\\emptyset", True),
    ("30^\\circ", "30", True),
    ("", "5", False),
    ("No", "yes", False),
]


@pytest.mark.parametrize("pred, gt, expected", ANSWER_TABLE)
def test_answer_matches_table(pred, gt, expected):
    assert R.answer_matches(pred, gt) is expected


def test_answer_table_is_large_enough():
    assert len(ANSWER_TABLE) >= 30


@pytest.mark.parametrize(
    "pred, gt, err",
    [(5, "5", TypeError), ("5", 5, TypeError), ("5", [], ValueError), ("5", ["5", 5], TypeError)],
)
def test_answer_matches_bad_input(pred, gt, err):
    with pytest.raises(err, match="pred|gt"):
        R.answer_matches(pred, gt)


# ---------------------------------------------------------------------------------------------------------
# accuracy_reward
# ---------------------------------------------------------------------------------------------------------


def test_accuracy_boxed_nested():
    # \frac{\text{1}}{2} -> unwrap -> \frac{1}{2} -> 0.5
    assert R.accuracy_reward("thinking... \\boxed{\\frac{\\text{1}}{2}}", "0.5") == 1.0
    assert R.accuracy_reward("\\boxed{3} no wait \\boxed{4}", "3") == 0.0  # last box wins


def test_accuracy_require_boxed_is_honoured():
    text = "I looked closely.\nAnswer: B. the red car"
    assert R.accuracy_reward(text, "B", require_boxed=True) == 0.0
    assert R.accuracy_reward(text, "B", require_boxed=False) == 1.0


def test_accuracy_answer_tag_fallback_order():
    # <answer> comes before "Answer:" in the fallback order.
    text = "<answer>7</answer> ... Answer: 8"
    assert R.accuracy_reward(text, "7", require_boxed=False) == 1.0
    assert R.accuracy_reward(text, "8", require_boxed=False) == 0.0
    # A box beats both fallbacks.
    assert R.accuracy_reward("<answer>7</answer> \\boxed{9}", "9", require_boxed=False) == 1.0


def test_accuracy_failed_call_flag_is_own():
    assert R.accuracy_reward("\\boxed{5}", "5", ended_after_failed_call=True) == 0.0
    assert R.accuracy_reward("\\boxed{5}", "5", ended_after_failed_call=False) == 1.0


def test_accuracy_no_answer():
    assert R.accuracy_reward("I do not know", "5", require_boxed=False) == 0.0
    with pytest.raises(TypeError, match="response_text"):
        R.accuracy_reward(None, "5")


# ---------------------------------------------------------------------------------------------------------
# RaPR and shaping
# ---------------------------------------------------------------------------------------------------------


def test_rapr():
    assert R.rapr(np.array([True, False, False, False])) == 0.25
    assert R.rapr(np.array([True, True])) == 1.0
    with pytest.raises(TypeError, match="bool"):
        R.rapr(np.array([1, 0]))
    with pytest.raises(ValueError, match="non-empty"):
        R.rapr(np.array([], bool))


# One group of 8: sample 0 answers right with 3 calls (all valid); sample 1 makes one ERRORED call (0 valid);
# sample 7 answers right without tools.
ACC = np.array([1, 0, 0, 0, 0, 0, 0, 1], float)
CALLS = np.array([3, 1, 0, 0, 0, 0, 0, 0])
VALID = np.array([3, 0, 0, 0, 0, 0, 0, 0])
PAPER = dict(alpha=0.5, H=0.3, beta=0.05, N=1)
CODE = dict(alpha=0.25, H=0.3, beta=0.05, N=1)


def test_paper_form_hand_computed():
    out = R.REWARD_SHAPERS["paper"](ACC, CALLS, VALID, is_video=False, **PAPER)
    # RaPR counts valid ops: 1 of 8 = 0.125. bonus = 0.5 * (0.3 - 0.125) = 0.0875 for sample 0 only.
    assert out["rapr"] == 0.125
    bonus = np.array([0.0875, 0, 0, 0, 0, 0, 0, 0])
    # penalty = 0.05 * min(1 - 3, 0) = -0.1 for sample 0; errored call of sample 1 does not count.
    penalty = np.array([-0.1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(out["bonus"], bonus, atol=1e-12)
    np.testing.assert_allclose(out["penalty"], penalty, atol=1e-12)
    np.testing.assert_allclose(out["shaped"], [0.9875, 0, 0, 0, 0, 0, 0, 1.0], atol=1e-12)
    # Video makes no difference in the paper form.
    vid = R.REWARD_SHAPERS["paper"](ACC, CALLS, VALID, is_video=True, **PAPER)
    np.testing.assert_allclose(vid["shaped"], out["shaped"], atol=0)


def test_code_form_hand_computed_image_and_video():
    img = R.REWARD_SHAPERS["code"](ACC, CALLS, VALID, is_video=False, **CODE)
    # RaPR counts every call: 2 of 8 = 0.25. image bonus = 0.25 * (0.3 - 0.25) / (2 * 0.25) = 0.025.
    assert img["rapr"] == 0.25
    np.testing.assert_allclose(img["bonus"], [0.025, 0.025, 0, 0, 0, 0, 0, 0], atol=1e-12)
    # penalty = -0.05 * (n_calls - 1): -0.1 for 3 calls, 0 for 1 call.
    np.testing.assert_allclose(img["penalty"], [-0.1, 0, 0, 0, 0, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(img["shaped"], [0.925, 0.025, 0, 0, 0, 0, 0, 1.0], atol=1e-12)
    vid = R.REWARD_SHAPERS["code"](ACC, CALLS, VALID, is_video=True, **CODE)
    # video bonus = 0.25 * 0.05 / (1.5 * 0.25) = 0.0125 / 0.375 = 1/30.
    np.testing.assert_allclose(vid["bonus"], [1 / 30, 1 / 30, 0, 0, 0, 0, 0, 0], atol=1e-12)


def test_code_form_largest_bonus_matches_reference_numbers():
    # RaPR = 1/8: image 0.25 * 0.175 / 0.25 = 0.175; video 0.25 * 0.175 / 0.1875 = 0.2333...
    calls = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    acc = np.zeros(8)
    img = R.shape_group_code(acc, calls, calls, is_video=False, **CODE)
    vid = R.shape_group_code(acc, calls, calls, is_video=True, **CODE)
    assert img["bonus"][0] == pytest.approx(0.175, abs=1e-12)
    assert vid["bonus"][0] == pytest.approx(0.04375 / 0.1875, abs=1e-12)


@pytest.mark.parametrize("form", ["paper", "code"])
def test_no_bonus_when_rapr_zero_or_above_target(form):
    acc = np.array([1.0, 0.0, 1.0, 0.0])
    zero = np.zeros(4, int)
    out = R.REWARD_SHAPERS[form](acc, zero, zero, is_video=False, **PAPER)
    assert out["rapr"] == 0.0
    np.testing.assert_array_equal(out["shaped"], acc)  # no 0/0 in the code form
    half = np.array([1, 1, 0, 0])  # RaPR 0.5 >= H 0.3: no bonus; one op each: no penalty
    out = R.REWARD_SHAPERS[form](acc, half, half, is_video=False, **PAPER)
    np.testing.assert_array_equal(out["bonus"], np.zeros(4))
    np.testing.assert_array_equal(out["shaped"], acc)


@pytest.mark.parametrize("form", ["paper", "code"])
def test_switches(form):
    params = PAPER if form == "paper" else CODE
    out = R.REWARD_SHAPERS[form](ACC, CALLS, VALID, is_video=False, curiosity=False, penalty=False, **params)
    np.testing.assert_array_equal(out["shaped"], ACC)
    only_pen = R.REWARD_SHAPERS[form](ACC, CALLS, VALID, is_video=False, curiosity=False, **params)
    np.testing.assert_array_equal(only_pen["bonus"], np.zeros(8))
    assert only_pen["penalty"][0] == pytest.approx(-0.1, abs=1e-12)


def test_batch_rewards_two_groups():
    # group 0: RaPR 1/4 (sample 0, 2 valid ops); group 1: no tools at all.
    acc = np.array([1, 0, 0, 1, 0, 0, 1, 1], float)
    calls = np.array([2, 0, 0, 0, 0, 0, 0, 0])
    out = R.batch_rewards(acc, calls, calls, group_size=4, is_video=False, form="paper", **PAPER)
    # bonus 0.5 * (0.3 - 0.25) = 0.025; penalty 0.05 * min(1 - 2, 0) = -0.05.
    np.testing.assert_allclose(out["shaped"], [0.975, 0, 0, 1, 0, 0, 1, 1], atol=1e-12)
    np.testing.assert_allclose(out["rapr_per_group"], [0.25, 0.0])
    assert out["rapr"] == pytest.approx(0.125)
    # Per-sample modality, constant per group: group 0 video, group 1 image (code form).
    vid = np.array([True] * 4 + [False] * 4)
    code = R.batch_rewards(acc, calls, calls, group_size=4, is_video=vid, form="code", **CODE)
    # video bonus 0.25 * 0.05 / (1.5 * 0.25) = 1/30; penalty -0.05 * (2 - 1).
    assert code["shaped"][0] == pytest.approx(1 + 1 / 30 - 0.05, abs=1e-12)
    with pytest.raises(ValueError, match="constant within each group"):
        R.batch_rewards(acc, calls, calls, group_size=4, is_video=np.arange(8) % 2 == 0, form="code", **CODE)


def test_each_form_carries_its_own_constants():
    # One group of 8, sample 0 makes 3 calls: RaPR 1/8 in both forms (its calls are valid).
    acc, calls = np.zeros(8), np.array([3, 0, 0, 0, 0, 0, 0, 0])
    vid = np.zeros(8, bool)
    code = R.batch_rewards(acc, calls, calls, group_size=8, is_video=vid, form="code")
    # Released code: 0.25 * (0.3 - 0.125) / (2 * 0.125) = 0.175; penalty -0.05 * (3 - 1) = -0.1.
    assert code["bonus"][0] == pytest.approx(0.175, abs=1e-12)
    assert code["penalty"][0] == pytest.approx(-0.1, abs=1e-12)
    video = R.batch_rewards(acc, calls, calls, group_size=8, is_video=~vid, form="code")
    assert video["bonus"][0] == pytest.approx(0.25 * 0.175 / 0.1875, abs=1e-12)  # the 1.5 * RaPR divisor
    paper = R.batch_rewards(acc, calls, calls, group_size=8, is_video=vid, form="paper")
    # Paper: 0.5 * (0.3 - 0.125) = 0.0875; penalty 0.05 * min(1 - 3, 0) = -0.1.
    assert paper["bonus"][0] == pytest.approx(0.0875, abs=1e-12)
    assert paper["penalty"][0] == pytest.approx(-0.1, abs=1e-12)
    # A value set explicitly applies to either form; the others stay the form's.
    set_alpha = R.batch_rewards(acc, calls, calls, group_size=8, is_video=vid, form="code", alpha=0.5)
    assert set_alpha["bonus"][0] == pytest.approx(0.35, abs=1e-12)
    assert R.form_constants("code", beta=0.1) == {"alpha": 0.25, "H": 0.3, "beta": 0.1, "N": 1}
    with pytest.raises(ValueError, match="form must be"):
        R.form_constants("dapo")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_calls=np.array([1, -1])), "non-negative"),
        (dict(n_calls=np.array([1, 2, 3])), "length 2"),
        (dict(n_valid_ops=np.array([0.5, 1.0])), "integer"),
        (dict(alpha=-1.0), "alpha"),
        (dict(H=1.5), "H must"),
    ],
)
def test_shape_group_bad_input(kwargs, match):
    args = dict(acc=np.array([1.0, 0.0]), n_calls=np.array([1, 0]), n_valid_ops=np.array([1, 0]))
    args.update({k: v for k, v in kwargs.items() if k in args})
    params = {**PAPER, **{k: v for k, v in kwargs.items() if k in PAPER}}
    with pytest.raises(ValueError, match=match):
        R.shape_group_paper(args["acc"], args["n_calls"], args["n_valid_ops"], is_video=False, **params)


def test_batch_rewards_bad_input():
    acc, calls = np.zeros(6), np.zeros(6, int)
    with pytest.raises(ValueError, match="form must be"):
        R.batch_rewards(acc, calls, calls, group_size=3, is_video=False, form="nope", **PAPER)
    with pytest.raises(ValueError, match="multiple of group_size"):
        R.batch_rewards(acc, calls, calls, group_size=4, is_video=False, form="paper", **PAPER)
