"""Token losses for SFT and GRPO, each returned as (sum, denominator) so accumulation is exact.

jnp, jit-safe: the final loss is total_sum / total_denominator over all micro-batches and hosts.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Log-ratio clip before exp (tunix): keeps padded or far-off-policy tokens finite so masking by `where`
# never meets inf * 0.
_LOG_RATIO_CLIP = 20.0


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _check_bt(name: str, x, shape) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {x.shape}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} must have shape {shape} like logprobs, got {x.shape}")


def sft_loss(logprobs, mask) -> tuple[jax.Array, jax.Array]:
    """Negative log-likelihood of the trained tokens.

    Args:
        logprobs: log p(target token) (B, T).
        mask: (B, T); non-zero where the token is trained.

    Returns:
        (nll_sum, token_count), float32 scalars; the loss is their ratio after accumulation.
    """
    logprobs, mask = jnp.asarray(logprobs), jnp.asarray(mask)
    _check_bt("logprobs", logprobs, None)
    _check_bt("mask", mask, logprobs.shape)
    valid = mask != 0
    nll_sum = -jnp.sum(jnp.where(valid, _f32(logprobs), 0.0))
    return nll_sum, jnp.sum(valid, dtype=jnp.float32)


def kl_k3(logp, ref_logp) -> jax.Array:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased).

    The log difference is clipped to [-20, 20] so padded positions cannot overflow.
    """
    d = jnp.clip(_f32(ref_logp) - _f32(logp), -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP)
    return jnp.exp(d) - d - 1.0


# ---------------------------------------------------------------------------------------------------------
# Aggregation: per-token losses (B, T) + validity (B, T) -> (sum, denominator)
# ---------------------------------------------------------------------------------------------------------


def _token_mean(loss_bt, valid_bt, max_len):
    del max_len
    return jnp.sum(loss_bt * valid_bt), jnp.sum(valid_bt)


def _seq_counts(valid_bt):
    n_tok_b = jnp.sum(valid_bt, axis=1)
    # Rows without a trained token are padding rows (batch buckets): they count as no sequence.
    return n_tok_b, jnp.sum((n_tok_b > 0).astype(jnp.float32))


def _seq_mean_token_mean(loss_bt, valid_bt, max_len):
    del max_len
    n_tok_b, n_seq = _seq_counts(valid_bt)
    per_seq = jnp.sum(loss_bt * valid_bt, axis=1) / jnp.maximum(n_tok_b, 1.0)
    return jnp.sum(per_seq), n_seq


def _seq_mean_token_sum(loss_bt, valid_bt, max_len):
    del max_len
    _, n_seq = _seq_counts(valid_bt)
    return jnp.sum(loss_bt * valid_bt), n_seq


def _seq_mean_token_sum_norm(loss_bt, valid_bt, max_len):
    # Dr.GRPO: a constant per-sequence divisor (the generation budget) removes the length bias.
    if max_len is None:
        raise ValueError("agg 'seq-mean-token-sum-norm' needs max_len (the constant per-sequence divisor)")
    _, n_seq = _seq_counts(valid_bt)
    return jnp.sum(loss_bt * valid_bt) / max_len, n_seq


AggFn = Callable[[jax.Array, jax.Array, float | None], tuple[jax.Array, jax.Array]]
LOSS_AGG: dict[str, AggFn] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def grpo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    eps_low: float,
    eps_high: float,
    agg: str = "token-mean",
    kl_coef: float = 0.0,
    ref_logprobs=None,
    sampler_logprobs=None,
    tis_cap: float | None = None,
    max_len: int | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate with separate low/high eps, optional k3 KL and truncated importance weights.

    Per token: ratio = exp(clip(logp - old, -20, 20)), pg = -min(ratio*A, clip(ratio, 1-eps_low,
    1+eps_high)*A) * w, where w = stop_gradient(min(exp(old - sampler), tis_cap)) when `sampler_logprobs` is
    given (token-level TIS: `old` is the trainer's log-prob at rollout time, `sampler` the rollout engine's)
    and 1 otherwise; loss = pg + kl_coef * k3(logp, ref). `LOSS_AGG[agg]` turns the masked per-token losses
    into (sum, denominator); the original's constant divisor 200 is not copied (§12.5).

    Args:
        logprobs: current log-probs (B, T), differentiated.
        old_logprobs: log-probs of the policy that produced the samples (B, T), not differentiated.
        advantages: one per sequence (B,), broadcast over its tokens.
        mask: (B, T); non-zero where the token is trained.
        eps_low, eps_high: the ratio is clipped to [1 - eps_low, 1 + eps_high].
        agg: a key of `LOSS_AGG`.
        kl_coef: weight of the k3 KL term; needs `ref_logprobs` when non-zero.
        ref_logprobs: reference log-probs (B, T); when given, the KL metric is computed even at kl_coef 0.
        sampler_logprobs: the sampler's log-probs (B, T); needs `tis_cap`.
        tis_cap: truncation of the importance weight.
        max_len: per-sequence divisor for "seq-mean-token-sum-norm".

    Returns:
        (loss_sum, denom, metrics); metrics are sums over trained tokens: `clip_low` (tokens whose gradient
        the low clip cuts: ratio < 1-eps_low with A < 0), `clip_high` (ratio > 1+eps_high with A > 0),
        `ratio`, `kl` (0 without a reference), `tis_weight` (1 per token without TIS), `tis_truncated`
        (tokens whose weight hit the cap), and `n_tokens` to divide them by.
    """
    if agg not in LOSS_AGG:
        raise ValueError(f"agg must be one of {sorted(LOSS_AGG)}, got {agg!r}")
    if (sampler_logprobs is None) != (tis_cap is None):
        raise ValueError("sampler_logprobs and tis_cap go together: pass both for TIS, or neither")
    if ref_logprobs is None and isinstance(kl_coef, (int, float)) and kl_coef != 0:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if (
        isinstance(eps_low, (int, float))
        and isinstance(eps_high, (int, float))
        and min(eps_low, eps_high) < 0
    ):
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    logprobs = _f32(logprobs)
    _check_bt("logprobs", logprobs, None)
    old = jax.lax.stop_gradient(_f32(old_logprobs))
    _check_bt("old_logprobs", old, logprobs.shape)
    mask = jnp.asarray(mask)
    _check_bt("mask", mask, logprobs.shape)
    adv = jax.lax.stop_gradient(_f32(advantages))
    if adv.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must have shape ({logprobs.shape[0]},), got {adv.shape}")
    valid = (mask != 0).astype(jnp.float32)
    a_bt = adv[:, None]

    ratio = jnp.exp(jnp.clip(logprobs - old, -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP))
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = -jnp.minimum(ratio * a_bt, clipped * a_bt)

    ones = jnp.ones_like(logprobs)
    tis_w, tis_truncated = ones, jnp.zeros_like(logprobs)
    if sampler_logprobs is not None:
        sampler = _f32(sampler_logprobs)
        _check_bt("sampler_logprobs", sampler, logprobs.shape)
        raw = jnp.exp(jnp.clip(old - sampler, -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP))
        tis_w = jax.lax.stop_gradient(jnp.minimum(raw, tis_cap))
        tis_truncated = (raw > tis_cap).astype(jnp.float32)
    per_token = pg * tis_w

    kl = jnp.zeros_like(logprobs)
    if ref_logprobs is not None:
        ref = jax.lax.stop_gradient(_f32(ref_logprobs))
        _check_bt("ref_logprobs", ref, logprobs.shape)
        kl = kl_k3(logprobs, ref)
        per_token = per_token + kl_coef * kl

    # `where` rather than a product alone: a masked-out NaN must not reach the sum or its gradient.
    per_token = jnp.where(valid > 0, per_token, 0.0)
    loss_sum, denom = LOSS_AGG[agg](per_token, valid, max_len)

    def msum(x):
        return jnp.sum(jnp.where(valid > 0, x, 0.0))

    metrics = {
        "clip_low": msum(((ratio < 1.0 - eps_low) & (a_bt < 0)).astype(jnp.float32)),
        "clip_high": msum(((ratio > 1.0 + eps_high) & (a_bt > 0)).astype(jnp.float32)),
        "ratio": msum(jax.lax.stop_gradient(ratio)),
        "kl": msum(jax.lax.stop_gradient(kl)),
        "tis_weight": msum(tis_w),
        "tis_truncated": msum(tis_truncated),
        "n_tokens": jnp.sum(valid),
    }
    return loss_sum, denom, metrics
