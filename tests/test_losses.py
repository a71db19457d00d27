"""Tests for train/losses.py: golden values, aggregation and micro-batch exactness, clipping, k3, TIS,
and the GRPO gradient of a tiny softmax policy against the analytic one.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_reasoner_jax.train import losses as L

TOL = 1e-5  # leaf ops
CTOL = 1e-4  # composites


def test_sft_loss():
    logp = np.array([[-1.0, -2.0, -3.0], [-0.5, -4.0, -1.0]])
    mask = np.array([[1, 1, 0], [0, 1, 1]])
    nll, count = L.sft_loss(logp, mask)
    # 1 + 2 + 4 + 1 = 8 over 4 tokens.
    assert float(nll) == pytest.approx(8.0, abs=TOL)
    assert float(count) == 4.0


def test_kl_k3_values():
    logp = jnp.array([-1.0, -2.0, -1.5])
    ref = jnp.array([-2.0, -1.0, -1.5])
    # d = ref - logp: -1 -> e^-1 + 1 - 1 = e^-1; +1 -> e - 2; 0 -> 0.
    np.testing.assert_allclose(L.kl_k3(logp, ref), [math.exp(-1), math.e - 2, 0.0], atol=TOL)


# Three sequences (lengths 3, 1, 2) and a padding row, on policy: every token's loss is -A.
ADV = np.array([0.5, -1.0, 2.0, 7.0])
MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
LOGP = np.log(np.array([[0.5, 0.25, 0.1, 0.3], [0.2, 0.4, 0.6, 0.3], [0.9, 0.7, 0.3, 0.3], [0.5] * 4]))


@pytest.mark.parametrize(
    "agg, expected_sum, expected_denom",
    [
        ("token-mean", 3 * -0.5 + 1 * 1.0 + 2 * -2.0, 6.0),  # -4.5 / 6
        ("seq-mean-token-mean", -0.5 + 1.0 - 2.0, 3.0),  # per-sequence means; padding row excluded
        ("seq-mean-token-sum", -1.5 + 1.0 - 4.0, 3.0),
        ("seq-mean-token-sum-norm", (-1.5 + 1.0 - 4.0) / 4, 3.0),  # Dr.GRPO: divided by max_len 4
    ],
)
def test_aggregations_on_policy(agg, expected_sum, expected_denom):
    s, d, m = L.grpo_loss(LOGP, LOGP, ADV, MASK, eps_low=0.2, eps_high=0.35, agg=agg, max_len=4)
    assert float(s) == pytest.approx(expected_sum, abs=TOL)
    assert float(d) == expected_denom
    assert float(m["ratio"]) == pytest.approx(6.0, abs=TOL)  # ratio 1 on 6 tokens
    assert float(m["n_tokens"]) == 6.0
    assert float(m["clip_low"]) == 0.0 and float(m["clip_high"]) == 0.0


@pytest.mark.parametrize("agg", sorted(L.LOSS_AGG))
def test_micro_batch_accumulation_is_exact(agg):
    rng = np.random.default_rng(0)
    b, t = 6, 5
    logp = np.log(rng.uniform(0.05, 0.95, (b, t)))
    old = logp + rng.normal(0, 0.3, (b, t))
    adv = rng.normal(0, 1, (b,))
    mask = (rng.uniform(size=(b, t)) < 0.7).astype(np.int32)
    mask[:, 0] = 1
    kw = dict(eps_low=0.2, eps_high=0.28, agg=agg, max_len=t)
    s, d, _ = L.grpo_loss(logp, old, adv, mask, **kw)
    parts = [
        L.grpo_loss(logp[sl], old[sl], adv[sl], mask[sl], **kw)
        for sl in (slice(0, 1), slice(1, 4), slice(4, 6))
    ]
    s_acc = sum(float(p[0]) for p in parts)
    d_acc = sum(float(p[1]) for p in parts)
    assert d_acc == float(d)
    assert s_acc / d_acc == pytest.approx(float(s) / float(d), abs=TOL)


def _one_token(ratio, adv, eps_low=0.2, eps_high=0.35):
    """Loss and d loss / d logp of a single token at log-ratio log(ratio)."""
    old = jnp.zeros((1, 1))
    mask = jnp.ones((1, 1))

    def f(lp):
        s, d, m = L.grpo_loss(lp, old, jnp.array([adv]), mask, eps_low=eps_low, eps_high=eps_high)
        return s / d, m

    (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.full((1, 1), math.log(ratio)))
    return float(loss), float(g[0, 0]), m


@pytest.mark.parametrize(
    "ratio, adv, loss, grad, clip_low, clip_high",
    [
        # A > 0, ratio above 1 + 0.35: clipped to 1.35, no gradient.
        (math.exp(0.5), 1.0, -1.35, 0.0, 0, 1),
        # A > 0, ratio below 1 - 0.2: the unclipped branch is the min, gradient -A * ratio.
        (math.exp(-0.5), 1.0, -math.exp(-0.5), -math.exp(-0.5), 0, 0),
        # A < 0, ratio below 0.8: -min(-0.607, -0.8) = 0.8, clipped, no gradient.
        (math.exp(-0.5), -1.0, 0.8, 0.0, 1, 0),
        # A < 0, ratio above 1.35: unclipped, loss = ratio, gradient = ratio.
        (math.exp(0.5), -1.0, math.exp(0.5), math.exp(0.5), 0, 0),
        # Inside the band: loss -A * ratio.
        (1.1, 2.0, -2.2, -2.2, 0, 0),
    ],
)
def test_clip_both_sides(ratio, adv, loss, grad, clip_low, clip_high):
    got_loss, got_grad, m = _one_token(ratio, adv)
    assert got_loss == pytest.approx(loss, abs=TOL)
    assert got_grad == pytest.approx(grad, abs=TOL)
    assert float(m["clip_low"]) == clip_low and float(m["clip_high"]) == clip_high


def test_tis_cap_and_weights():
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.5]]))
    old = logp
    # old - sampler = log 3 (weight 3 -> capped at 2), log 0.5 (0.5), 0 (1).
    sampler = old - jnp.log(jnp.array([[3.0, 0.5, 1.0]]))
    mask = jnp.ones((1, 3))
    adv = jnp.array([1.0])

    def f(lp):
        s, d, m = L.grpo_loss(
            lp, old, adv, mask, eps_low=0.2, eps_high=0.2, sampler_logprobs=sampler, tis_cap=2.0
        )
        return s, m

    (s, m), g = jax.value_and_grad(f, has_aux=True)(logp)
    # on policy: per-token loss -A * w = -2, -0.5, -1; gradient the same (d ratio / d logp = 1).
    assert float(s) == pytest.approx(-3.5, abs=TOL)
    np.testing.assert_allclose(g, [[-2.0, -0.5, -1.0]], atol=TOL)
    assert float(m["tis_weight"]) == pytest.approx(3.5, abs=TOL)
    assert float(m["tis_truncated"]) == 1.0


def test_kl_term_value_and_gradient():
    logp = jnp.log(jnp.array([[0.5, 0.2]]))
    ref = jnp.log(jnp.array([[0.25, 0.2]]))
    mask = jnp.ones((1, 2))
    coef = 0.1

    def f(lp):
        s, d, m = L.grpo_loss(
            lp, logp, jnp.array([0.0]), mask, eps_low=0.2, eps_high=0.2, kl_coef=coef, ref_logprobs=ref
        )
        return s, m

    (s, m), g = jax.value_and_grad(f, has_aux=True)(logp)
    # A = 0, so only KL: token 0 d = log 0.5 -> 0.5 - log 0.5 - 1 = log 2 - 0.5; token 1: 0.
    k3 = math.log(2) - 0.5
    assert float(s) == pytest.approx(coef * k3, abs=TOL)
    assert float(m["kl"]) == pytest.approx(k3, abs=TOL)
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - 0.5 = 0.5 on token 0, 0 on token 1.
    np.testing.assert_allclose(g, [[coef * 0.5, 0.0]], atol=TOL)


def test_masked_tokens_get_no_gradient_even_if_nonfinite():
    logp = jnp.array([[-1.0, -jnp.inf]])
    old = jnp.array([[-1.2, -1.0]])
    mask = jnp.array([[1, 0]])

    def f(lp):
        return L.grpo_loss(lp, old, jnp.array([1.0]), mask, eps_low=0.2, eps_high=0.35)[0]

    val, g = jax.value_and_grad(f)(logp)
    assert np.isfinite(float(val))
    assert np.all(np.isfinite(np.asarray(g))) and float(g[0, 1]) == 0.0


def test_jit_matches_eager():
    kw = dict(eps_low=0.2, eps_high=0.35, agg="seq-mean-token-mean")
    old = LOGP + 0.1
    eager = L.grpo_loss(LOGP, old, ADV, MASK, **kw)
    jitted = jax.jit(functools.partial(L.grpo_loss, **kw))(LOGP, old, ADV, MASK)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, atol=TOL)


# ---------------------------------------------------------------------------------------------------------
# The GRPO gradient of a two-sample group equals the hand-computed one
# ---------------------------------------------------------------------------------------------------------

THETA = np.array([0.1, -0.3, 0.5, 0.2])
TOKENS = np.array([[0, 2], [1, 0]])  # sample 0 emits tokens 0, 2; sample 1 emits token 1 then padding
GMASK = np.array([[1, 1], [1, 0]])
GADV = np.array([0.5, -0.5])  # rewards (1, 0) minus their mean
N_TOKENS = 3


def _policy_logp(theta):
    return jax.nn.log_softmax(theta)[TOKENS]


def _grad(old):
    def f(theta):
        s, d, _ = L.grpo_loss(_policy_logp(theta), old, GADV, GMASK, eps_low=0.2, eps_high=0.35)
        return s / d

    return np.asarray(jax.grad(f)(jnp.asarray(THETA, jnp.float32)))


def _softmax_np(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_grpo_gradient_on_policy():
    p = _softmax_np(THETA)
    eye = np.eye(4)
    # ratio 1 everywhere: -(1/n) sum_i A_i (onehot(a_i) - p) over the 3 trained tokens.
    expected = -(GADV[0] * (eye[0] - p) + GADV[0] * (eye[2] - p) + GADV[1] * (eye[1] - p)) / N_TOKENS
    old = np.log(p)[TOKENS]
    np.testing.assert_allclose(_grad(old), expected, atol=CTOL)


def test_grpo_gradient_off_policy_with_one_clipped_token():
    p = _softmax_np(THETA)
    eye = np.eye(4)
    old = np.log(p)[TOKENS].copy()
    old[0, 0] -= 0.5  # ratio e^0.5 = 1.65 > 1.35 with A > 0: clipped, contributes nothing
    old[1, 0] -= 0.1  # ratio e^0.1 = 1.105 inside the band: contributes with weight 1.105
    expected = -(GADV[0] * (eye[2] - p) + GADV[1] * math.exp(0.1) * (eye[1] - p)) / N_TOKENS
    np.testing.assert_allclose(_grad(old), expected, atol=CTOL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(agg="mean"), "agg must be"),
        (dict(tis_cap=2.0), "go together"),
        (dict(kl_coef=0.1), "needs ref_logprobs"),
        (dict(agg="seq-mean-token-sum-norm"), "needs max_len"),
        (dict(eps_low=-0.1), "eps_low"),
    ],
)
def test_bad_options(kwargs, match):
    kw = (
        dict(eps_low=0.2, eps_high=0.35, **kwargs)
        if "eps_low" not in kwargs
        else dict(eps_high=0.35, **kwargs)
    )
    with pytest.raises(ValueError, match=match):
        L.grpo_loss(LOGP, LOGP, ADV, MASK, **kw)


def test_bad_shapes():
    with pytest.raises(ValueError, match="advantages must have shape"):
        L.grpo_loss(LOGP, LOGP, ADV[:2], MASK, eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match="old_logprobs must have shape"):
        L.grpo_loss(LOGP, LOGP[:, :2], ADV, MASK, eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match="mask must have shape"):
        L.sft_loss(LOGP, MASK[:2])
