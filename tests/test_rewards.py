"""Tests for train/rewards.py: the accuracy reward over both scorings (answers.py), RaPR, both shaping forms.

Expected values are worked out by hand in the comments, never taken from the code under test.
"""

import numpy as np
import pytest

from pixel_reasoner_jax.train import rewards as R

# ---------------------------------------------------------------------------------------------------------
# accuracy_reward
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scoring, solution, gt, require_boxed, expected",
    [
        ("strict", "\\boxed{3} no wait \\boxed{4}", "3", True, 0.0),  # the last box
        ("strict", "I looked closely.\nAnswer: B. the red car", "B", True, 0.0),  # box required
        ("strict", "I looked closely.\nAnswer: B. the red car", "B", False, 1.0),  # fallback allowed
        ("original", "There are 3 dogs.", "3", True, 1.0),  # no box needed; require_boxed is strict's
        ("original", "The answer is B.", "B", True, -1.0),  # nothing parsable: the original's -1
        ("strict", "The answer is B.", "B", False, 0.0),
    ],
)
def test_accuracy_follows_the_scoring(scoring, solution, gt, require_boxed, expected):
    assert R.accuracy_reward(solution, gt, scoring=scoring, require_boxed=require_boxed) == expected


@pytest.mark.parametrize("scoring", ["original", "strict"])
def test_accuracy_failed_call_zeroes_only_a_correct_answer(scoring):
    assert R.accuracy_reward("\\boxed{5}", "5", scoring=scoring, ended_after_failed_call=True) == 0.0
    assert R.accuracy_reward("\\boxed{5}", "5", scoring=scoring, ended_after_failed_call=False) == 1.0
    # The original zeroes `r > 0.5` only: its -1 stays.
    assert (
        R.accuracy_reward("The answer is B.", "B", scoring="original", ended_after_failed_call=True) == -1.0
    )


def test_accuracy_bad_input():
    with pytest.raises(TypeError, match="response must be str"):
        R.accuracy_reward(None, "5", scoring="strict")
    with pytest.raises(ValueError, match="scoring must be one of"):
        R.accuracy_reward("\\boxed{5}", "5", scoring="exact")


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
