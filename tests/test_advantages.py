"""Tests for train/advantages.py: each registry entry and uniform-group detection, with hand arithmetic."""

import numpy as np
import pytest

from pixel_reasoner_jax.train import advantages as A

# Two groups of 4: an informative one and a uniform one.
REWARDS = np.array([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])


def test_registry_names():
    assert set(A.ADVANTAGES) == {"grpo", "mean", "rloo"}


def test_mean():
    # group mean 0.25 -> [0.75, -0.25, -0.25, -0.25]; the uniform group gives zeros.
    out = A.group_advantages(REWARDS, 4, "mean")
    np.testing.assert_allclose(out, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], atol=1e-12)


def test_grpo():
    # std (ddof=1) of [1,0,0,0]: squared deviations 0.5625 + 3 * 0.0625 = 0.75; / 3 = 0.25; sqrt = 0.5.
    eps = 1e-6
    out = A.group_advantages(REWARDS, 4, "grpo", eps=eps)
    d = 0.5 + eps
    np.testing.assert_allclose(out, [0.75 / d, -0.25 / d, -0.25 / d, -0.25 / d, 0, 0, 0, 0], rtol=1e-12)


def test_rloo():
    # r_i - mean of the other three: 1 - 0 = 1; 0 - 1/3 = -1/3.
    out = A.group_advantages(REWARDS, 4, "rloo")
    np.testing.assert_allclose(out, [1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0], atol=1e-12)


@pytest.mark.parametrize("name", ["grpo", "mean", "rloo"])
def test_permutation_equivariant_and_zero_sum(name):
    r = np.array([0.3, 1.2, 0.0, 0.9, 1.0, 1.0, 0.0, 0.0])
    perm = np.array([2, 0, 3, 1])
    base = A.group_advantages(r, 4, name)
    permuted = A.group_advantages(np.concatenate([r[:4][perm], r[4:]]), 4, name)
    np.testing.assert_allclose(permuted[:4], base[:4][perm], atol=1e-12)
    np.testing.assert_allclose(base.reshape(2, 4).sum(axis=1), 0.0, atol=1e-12)


def test_uniform_groups():
    r = np.array(
        [1.0, 0.0, 0.0, 0.0]  # mean abs deviation (0.75 + 3 * 0.25) / 4 = 0.375 -> informative
        + [0.5, 0.5, 0.5, 0.5]  # 0 -> uniform
        + [0.5, 0.5, 0.5, 0.52]  # mean 0.505; (3 * 0.005 + 0.015) / 4 = 0.0075 < 0.01 -> uniform
        + [0.5, 0.5, 0.5, 0.55]  # mean 0.5125; (3 * 0.0125 + 0.0375) / 4 = 0.01875 -> informative
    )
    np.testing.assert_array_equal(A.uniform_groups(r, 4), [False, True, True, False])
    # A looser tolerance makes the last group uniform too.
    np.testing.assert_array_equal(A.uniform_groups(r, 4, tol=0.02), [False, True, True, True])


@pytest.mark.parametrize(
    "args, match",
    [
        ((REWARDS, 3, "mean"), "multiple of group_size"),
        ((REWARDS, 4, "ppo"), "advantage name"),
        ((REWARDS.reshape(2, 4), 4, "mean"), "1-D"),
        ((np.array([1.0, np.nan]), 2, "mean"), "finite"),
        ((np.array([1.0, 0.0]), 1, "grpo"), "group_size >= 2"),
        ((np.array([1.0, 0.0]), 1, "rloo"), "group_size >= 2"),
        ((REWARDS, 0, "mean"), "positive int"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        A.group_advantages(*args)


def test_group_size_one_mean_is_zero():
    np.testing.assert_array_equal(A.group_advantages(np.array([1.0, 0.0]), 1, "mean"), [0.0, 0.0])
