"""Token sampling of the JAX sampler: per-row keys, top-k / top-p truncation and draws (SGLang semantics).

Every function treats rows independently, so a request's tokens never depend on its batch-mates.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pixel_reasoner_jax.processing.batch import pick_bucket

__all__ = ["PASSES", "row_keys", "sample_tokens", "sampling_passes", "truncation_mask"]


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


# Vocabulary entries per block of the two-level inverse CDF: a (B, V) cumulative sum is the slowest op of a
# CPU decode step (11 ms of ~26 at B=16, V=152k; XLA scans it in log-depth passes), while block sums, a
# cumulative sum over V/256 blocks and one over the chosen block cost a pass over the vocabulary and little else.
_CDF_BLOCK = 256


def _last_positive(x_bn: jax.Array) -> jax.Array:
    """Index of the last entry > 0 per row (0 when there is none)."""
    n = x_bn.shape[-1]
    return n - 1 - jnp.argmax((x_bn > 0)[:, ::-1], axis=-1)


def _first_above(cdf_bn: jax.Array, u_b: jax.Array, live_b: jax.Array) -> jax.Array:
    """The first index whose cdf exceeds u, clipped to `live_b` (u may round up to the total)."""
    return jnp.minimum(jnp.sum(cdf_bn <= u_b[:, None], axis=-1), live_b)


def _inverse_cdf(p_bv: jax.Array, keys_b: jax.Array) -> jax.Array:
    """One draw per row from unnormalised probabilities: one uniform per row instead of V Gumbel draws.

    Two levels: the block whose cumulative mass first exceeds u, then the entry inside it. Same law as a
    flat inverse CDF; a zero-probability entry is never drawn (its cdf equals its predecessor's).
    """
    b, v = p_bv.shape
    k = min(_CDF_BLOCK, v)
    nb = -(-v // k)
    blocks_bnk = jnp.pad(p_bv, ((0, 0), (0, nb * k - v))).reshape(b, nb, k)
    mass_bn = blocks_bnk.sum(axis=-1)
    cdf_bn = jnp.cumsum(mass_bn, axis=-1)
    u_b = jax.vmap(jax.random.uniform)(keys_b) * cdf_bn[:, -1]
    j_b = _first_above(cdf_bn, u_b, _last_positive(mass_bn))
    before_b = jnp.where(
        j_b > 0, jnp.take_along_axis(cdf_bn, jnp.maximum(j_b - 1, 0)[:, None], -1)[:, 0], 0.0
    )
    inner_bk = jnp.take_along_axis(blocks_bnk, j_b[:, None, None], axis=1)[:, 0]
    i_b = _first_above(before_b[:, None] + jnp.cumsum(inner_bk, axis=-1), u_b, _last_positive(inner_bk))
    return (j_b * k + i_b).astype(jnp.int32)


# The vocabulary-wide passes a batch may need: "greedy" (an argmax), "sample" (a draw from the tempered
# distribution), "truncate" (top-k / top-p by bisection over the vocabulary, before that draw), and "topk:K"
# (rows with 1 <= top_k <= K drawn among their K most likely tokens: `lax.top_k` takes 3 ms where the
# bisection takes ~60 at 16 rows x 152k on a CPU). Each is a static choice of the compiled program: on a CPU,
# a `lax.cond` that skips a pass at run time copies its (B, V) operands and costs as much as the pass.
PASSES = ("greedy", "sample", "truncate")
# Largest top_k the "topk:K" pass serves (K is the batch's largest top_k rounded up to a power of two).
TOPK_CAP = 1024


def sampling_passes(temperature, top_p, top_k) -> tuple[str, ...]:
    """The passes that rows with these (host) sampling parameters need (PASSES order, then "topk:K")."""
    t, p, k = np.asarray(temperature), np.asarray(top_p), np.asarray(top_k)
    sampled = t > 0
    truncated = sampled & ((p < 1.0) | (k > 0))
    by_topk = truncated & (k > 0) & (k <= TOPK_CAP)
    bisected = truncated & ~by_topk
    need = {
        "greedy": bool((~sampled).any()),
        "sample": bool((sampled & ~by_topk).any()),
        "truncate": bool(bisected.any()),
    }
    out = tuple(name for name in PASSES if need[name])
    if by_topk.any():
        out += (f"topk:{pick_bucket(int(k[by_topk].max()), None)}",)
    return out


def _topk_width(passes: tuple[str, ...]) -> int:
    """K of a "topk:K" pass (0 without one); raises on an unknown pass name."""
    width = 0
    for name in passes:
        if name.startswith("topk:") and name[5:].isdigit() and int(name[5:]) >= 1:
            width = int(name[5:])
        elif name not in PASSES:
            raise ValueError(f"sample_tokens: unknown pass {name!r}; expected {PASSES} or 'topk:K'")
    if not passes:
        raise ValueError("sample_tokens: passes must not be empty")
    return width


def sample_tokens(
    logits_bv: jax.Array,
    temperature_b: jax.Array,
    top_p_b: jax.Array,
    top_k_b: jax.Array,
    keys_b: jax.Array,
    passes: tuple[str, ...] = PASSES,
) -> tuple[jax.Array, jax.Array]:
    """Per-row sampled ids (B,) and their log-probs (B,) under SGLang's semantics.

    Log-probs are log_softmax(logits / temperature) over the whole vocabulary, before top-k / top-p
    truncation; temperature 0 is greedy (argmax) with log_softmax(logits). A row's draw depends only on
    its own logits, parameters and key, never on what its batch-mates ask for.

    Args:
      passes: static passes the rows need (`sampling_passes`); the default serves any rows by bisection. A
        row whose pass is left out gets a wrong token: "greedy" absent draws for greedy rows too, no draw
        pass takes the argmax for every row, "truncate" absent draws from the whole distribution, a
        "topk:K" pass serves the rows with 1 <= top_k <= K (the others keep the bisection's draw).
    """
    width = _topk_width(passes)
    greedy_b = temperature_b <= 0
    scaled_bv = logits_bv / jnp.where(greedy_b, 1.0, temperature_b)[:, None]
    # log p(tok) = scaled[tok] - logsumexp(scaled): the (B, V) log_softmax is only built when sampling.
    lse_b = jax.nn.logsumexp(scaled_bv, axis=-1)
    logp_bv = scaled_bv - lse_b[:, None]
    tok_b = None
    if "sample" in passes:
        p_bv = jnp.exp(logp_bv)
        if "truncate" in passes:
            truncate_b = ~greedy_b & ((top_p_b < 1.0) | (top_k_b > 0))
            keep_bv = truncation_mask(logp_bv, top_p_b, top_k_b) | ~truncate_b[:, None]
            p_bv = jnp.where(keep_bv, p_bv, 0.0)
        tok_b = _inverse_cdf(p_bv, keys_b)
    if width:
        # The K most likely tokens, most likely first; the same rule as `truncation_mask` on them (ties at
        # the k-th place are broken by token id, as a sort does, instead of sharing a fate).
        logp_bk, ids_bk = jax.lax.top_k(logp_bv, min(width, logp_bv.shape[-1]))
        p_bk = jnp.exp(logp_bk)
        rank_k = jnp.arange(p_bk.shape[-1])
        before_bk = jnp.cumsum(p_bk, axis=-1) - p_bk
        keep_bk = (rank_k < top_k_b[:, None]) & ((before_bk < top_p_b[:, None]) | (rank_k == 0))
        choice_b = _inverse_cdf(jnp.where(keep_bk, p_bk, 0.0), keys_b)
        topk_b = jnp.take_along_axis(ids_bk, choice_b[:, None], axis=-1)[:, 0]
        use_b = (top_k_b > 0) & (top_k_b <= width)
        tok_b = topk_b if tok_b is None else jnp.where(use_b, topk_b, tok_b)
    if tok_b is None or "greedy" in passes:
        best_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        tok_b = best_b if tok_b is None else jnp.where(greedy_b, best_b, tok_b)
    return tok_b, jnp.take_along_axis(scaled_bv, tok_b[:, None], axis=-1)[:, 0] - lse_b
