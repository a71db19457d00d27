"""Token sampling of the JAX sampler: per-row keys, top-k / top-p truncation and draws (SGLang semantics).

Every function treats rows independently, so a request's tokens never depend on its batch-mates.
"""

import jax
import jax.numpy as jnp

__all__ = ["row_keys", "sample_tokens", "truncation_mask"]


def row_keys(seeds_b2: jax.Array, step_b: jax.Array) -> jax.Array:
    """One key per row from its own seed and its own token index only: a row's draws never depend on its
    batch-mates, its slot or when it started (continuous batching)."""

    def one(words, step):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(words[0]), words[1]), step)

    return jax.vmap(one)(seeds_b2, jnp.broadcast_to(step_b, seeds_b2.shape[:1]))


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> int32 keys with the same order (so a threshold can be bisected exactly over the keys)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def truncation_mask(logp_bv: jax.Array, top_p_b: jax.Array, top_k_b: jax.Array) -> jax.Array:
    """(B, V) True for the tokens top-k (-1 off) and top-p keep; the most likely token is always kept.

    Token i survives when fewer than k tokens are more likely and the mass of the more likely tokens is
    below top_p (the sort-based definition; tied tokens share a fate). Both tests are monotone in the
    token's log-prob, so one exact 32-step bisection over the ordered bit patterns finds the smallest
    surviving key without sorting the vocabulary (XLA's sort is slow on CPU and the vocabulary is 152k).
    """
    key_bv = _order_keys(logp_bv)
    p_bv = jnp.exp(logp_bv)

    def kept(kappa_b):  # would a token at key kappa survive?
        above_bv = key_bv > kappa_b[:, None]
        mass_ok = (top_p_b >= 1.0) | (jnp.sum(jnp.where(above_bv, p_bv, 0.0), axis=-1) < top_p_b)
        count_ok = (top_k_b <= 0) | (jnp.sum(above_bv, axis=-1) < top_k_b)
        return mass_ok & count_ok

    def step(_, lo_hi):
        lo_b, hi_b = lo_hi
        mid_b = (lo_b >> 1) + (hi_b >> 1) + (lo_b & hi_b & 1)  # floor((lo + hi) / 2) without overflow
        ok_b = kept(mid_b)
        return jnp.where(ok_b, lo_b, mid_b + 1), jnp.where(ok_b, mid_b, hi_b)

    # Invariant: a token at key hi survives (the maximum always does); lo only rises past rejected keys.
    lo_b, _ = jax.lax.fori_loop(0, 32, step, (key_bv.min(axis=-1), key_bv.max(axis=-1)))
    return key_bv >= lo_b[:, None]


def _inverse_cdf(p_bv: jax.Array, keys_b: jax.Array) -> jax.Array:
    """One draw per row from unnormalised probabilities: one uniform per row instead of V Gumbel draws."""
    cdf_bv = jnp.cumsum(p_bv, axis=-1)
    u_b = jax.vmap(jax.random.uniform)(keys_b) * cdf_bv[:, -1]
    v = p_bv.shape[-1]
    # The first index whose cdf exceeds u; u may round up to the total, so clip to the last live token.
    last_b = v - 1 - jnp.argmax((p_bv > 0)[:, ::-1], axis=-1)
    return jnp.minimum(jnp.sum(cdf_bv <= u_b[:, None], axis=-1), last_b).astype(jnp.int32)


def sample_tokens(
    logits_bv: jax.Array,
    temperature_b: jax.Array,
    top_p_b: jax.Array,
    top_k_b: jax.Array,
    keys_b: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Per-row sampled ids (B,) and their log-probs (B,) under SGLang's semantics.

    Log-probs are log_softmax(logits / temperature) over the whole vocabulary, before top-k / top-p
    truncation; temperature 0 is greedy (argmax) with log_softmax(logits). A row's draw depends only on
    its own logits, parameters and key, never on what its batch-mates ask for.
    """
    greedy_b = temperature_b <= 0
    scaled_bv = logits_bv / jnp.where(greedy_b, 1.0, temperature_b)[:, None]
    # log p(tok) = scaled[tok] - logsumexp(scaled): the (B, V) log_softmax is only built when sampling.
    lse_b = jax.nn.logsumexp(scaled_bv, axis=-1)
    best_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    truncate_b = ~greedy_b & ((top_p_b < 1.0) | (top_k_b > 0))

    def stochastic(_):
        logp_bv = scaled_bv - lse_b[:, None]
        keep_bv = jax.lax.cond(
            truncate_b.any(),
            lambda: truncation_mask(logp_bv, top_p_b, top_k_b) | ~truncate_b[:, None],
            lambda: jnp.ones(logp_bv.shape, bool),
        )
        return _inverse_cdf(jnp.where(keep_bv, jnp.exp(logp_bv), 0.0), keys_b)

    # All-greedy batches (evaluation, benchmarks) skip the vocabulary-wide sampling work.
    sampled_b = jax.lax.cond(greedy_b.all(), lambda _: best_b, stochastic, None)
    tok_b = jnp.where(greedy_b, best_b, sampled_b)
    return tok_b, jnp.take_along_axis(scaled_bv, tok_b[:, None], axis=-1)[:, 0] - lse_b
