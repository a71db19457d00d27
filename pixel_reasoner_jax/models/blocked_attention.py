"""Blocked (flash-style) segment attention in pure JAX: query x key tiles, online softmax, fully masked
tiles skipped, and a hand-written backward pass that rebuilds tile probabilities from the logsumexp.

Memory is O(B * T * N * H) plus one (B, N, bq, bk) tile of float32 scores, instead of the dense path's
(B, N, T, S). The mask is the one `layers.attention` documents (equal segment ids, and key position <=
query position when causal), evaluated per tile. Which tiles hold any visible pair is decided once per
call from the whole (B, T, S) mask, built one query tile at a time and reduced to a (T / bq, S / bk)
table: T * S integer compares, about 1 / (4 N H) of the attention FLOPs, and exact for any segment layout
(vision windows, per-image blocks, padding, KV-cache validity), where per-tile segment min/max ranges
would only bound it. Each tile then runs under `lax.cond` on its table entry, so a skipped tile costs a
branch (on CPU, where this is the default, a real branch; under `vmap` it would turn into a select).

Rows that see no key at all (only the padding this module adds; the model's callers never produce
them) output 0, where the dense path would average every key.
"""

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["blocked_attention", "segment_mask"]

# Tile sizes measured on CPU (benchmarks/attention.py, T = 2048 fwd+bwd): 64 beat 32, 128, 256 and 512.
# Read at call time, so tests can shrink them for a whole model.
BLOCK_Q = 64
BLOCK_K = 64


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array,
    kv_segments: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    causal: bool,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """`layers.attention` (see there for the shapes and the mask) in (block_q x block_k) tiles.

    T and S are padded up to multiples of the tile sizes (default BLOCK_Q / BLOCK_K, clipped to T / S);
    padded keys are invisible to every query and padded query rows are dropped.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    bq, bk = min(block_q or BLOCK_Q, t), min(block_k or BLOCK_K, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk

    def pad(x, to):
        return jnp.pad(x, ((0, 0), (0, to - x.shape[1])) + ((0, 0),) * (x.ndim - 2))

    q_info = jnp.stack([pad(q_segments.astype(jnp.int32), tp), pad(q_positions.astype(jnp.int32), tp)])
    # A third row marks real keys: padded keys must stay invisible whatever segment id they would share.
    real = jnp.broadcast_to(jnp.arange(sp) < s, (b, sp)).astype(jnp.int32)
    kv_info = jnp.stack(
        [pad(kv_segments.astype(jnp.int32), sp), pad(kv_positions.astype(jnp.int32), sp), real]
    )
    out = _attention(pad(q, tp), pad(k, sp), pad(v, sp), q_info, kv_info, causal, bq, bk)
    return out[:, :t]


def segment_mask(q_segments, kv_segments, q_positions, kv_positions, causal: bool) -> jax.Array:
    """(B, T, S) bool: equal segment ids, and key position <= query position when causal."""
    m = q_segments[:, :, None] == kv_segments[:, None, :]
    if causal:
        m = m & (kv_positions[:, None, :] <= q_positions[:, :, None])
    return m


def _mask(q_info, kv_info, causal):
    """`segment_mask` from (2, B, Tq) query and (3, B, Sk) key segment / position / real rows."""
    return segment_mask(q_info[0], kv_info[0], q_info[1], kv_info[1], causal) & (kv_info[2][:, None, :] > 0)


def _tiles(x, block, axis=1):
    """Splits `axis` into (n, block) and moves n to the front: the scan axis."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _untiles(x, axis=1):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


def _prepare(q, k, v, q_info, kv_info, causal, bq, bk):
    """Tiled operands: q (nq, B, bq, K, G, H), k / v (nk, B, bk, K, H), infos, and the visit table."""
    b, tp, n, h = q.shape
    kh = k.shape[2]
    qi_t = _tiles(q_info, bq, 2)
    # One query tile's (B, bq, S) mask at a time: the whole (B, T, S) one would be a T * S byte buffer.
    visit = jax.lax.map(
        lambda qi: _mask(qi, kv_info, causal).reshape(b, bq, -1, bk).any(axis=(0, 1, 3)), qi_t
    )
    q_t = _tiles(q.reshape(b, tp, kh, n // kh, h), bq)
    return q_t, _tiles(k, bk), _tiles(v, bk), qi_t, _tiles(kv_info, bk, 2), visit


def _scores(q_i, k_j, qi_info, kj_info, causal, scale):
    """(B, K, G, bq, bk) float32 scaled scores with masked pairs at -inf."""
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q_i, k_j, preferred_element_type=jnp.float32) * scale
    return jnp.where(_mask(qi_info, kj_info, causal)[:, None, None], s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, q_info, kv_info, causal, bq, bk):
    return _forward(q, k, v, q_info, kv_info, causal, bq, bk)[0]


def _forward(q, k, v, q_info, kv_info, causal, bq, bk):
    b, tp, n, h = q.shape
    scale = 1.0 / math.sqrt(h)
    q_t, k_t, v_t, qi_t, ki_t, visit = _prepare(q, k, v, q_info, kv_info, causal, bq, bk)
    nk = k_t.shape[0]

    def q_tile(_, xs):
        q_i, qi_info, visit_i = xs
        kh, g = q_i.shape[2], q_i.shape[3]
        o = jnp.zeros(q_i.shape, jnp.float32)
        m = jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32)
        den = jnp.zeros((b, kh, g, bq), jnp.float32)

        def kv_tile(j, carry):
            def visit_tile(carry):
                o, m, den = carry
                s = _scores(q_i, k_t[j], qi_info, ki_t[j], causal, scale)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # no visible key yet: avoid inf - inf
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = jnp.einsum(
                    "BKGTS,BSKH->BTKGH", p.astype(v.dtype), v_t[j], preferred_element_type=jnp.float32
                )
                o = o * jnp.moveaxis(alpha, 3, 1)[..., None] + pv
                return o, m_new, den * alpha + p.sum(-1)

            return jax.lax.cond(visit_i[j], visit_tile, lambda c: c, carry)

        o, m, den = jax.lax.fori_loop(0, nk, kv_tile, (o, m, den))
        seen = den > 0
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), -jnp.inf)
        inv = jnp.where(seen, 1.0 / jnp.where(seen, den, 1.0), 0.0)
        out = (o * jnp.moveaxis(inv, 3, 1)[..., None]).astype(q.dtype)
        return None, (out, lse)

    _, (out_t, lse_t) = jax.lax.scan(q_tile, None, (q_t, qi_t, visit))
    out = _untiles(out_t).reshape(b, tp, n, h)
    return out, (q, k, v, q_info, kv_info, out, lse_t)


def _backward(causal, bq, bk, res, d_out):
    """FlashAttention-2 backward: per key tile (outer scan), the visible query tiles (inner loop) give
    P = exp(S - lse), dV += P^T dO, dS = P (dO V^T - rowsum(dO * O)), dK += dS^T Q; dQ += dS K is
    accumulated in float32 across key tiles."""
    q, k, v, q_info, kv_info, out, lse_t = res
    b, tp, n, h = q.shape
    kh = k.shape[2]
    scale = 1.0 / math.sqrt(h)
    q_t, k_t, v_t, qi_t, ki_t, visit = _prepare(q, k, v, q_info, kv_info, causal, bq, bk)
    do_t = _tiles(d_out.reshape(b, tp, kh, n // kh, h), bq)
    # rowsum(dO * O) per query and head: (nq, B, K, G, bq) like the logsumexp.
    delta_t = jnp.einsum(
        "IBTKGH,IBTKGH->IBKGT", do_t.astype(jnp.float32), _tiles(out.reshape(b, tp, kh, n // kh, h), bq)
    )
    nq = q_t.shape[0]
    lse_safe = jnp.where(jnp.isneginf(lse_t), jnp.inf, lse_t)  # rows that saw nothing: P = exp(-inf) = 0

    def kv_tile(dq, xs):
        k_j, v_j, kj_info, visit_j = xs

        def q_tile(i, carry):
            def visit_tile(carry):
                dq, dk, dv = carry
                q_i, do_i = q_t[i], do_t[i]
                s = _scores(q_i, k_j, qi_t[i], kj_info, causal, scale)
                p = jnp.exp(s - lse_safe[i][..., None])
                dv = dv + jnp.einsum(
                    "BKGTS,BTKGH->BSKH", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32
                )
                dp = jnp.einsum("BTKGH,BSKH->BKGTS", do_i, v_j, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_t[i][..., None]) * scale).astype(q.dtype)
                dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds, q_i, preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k_j, preferred_element_type=jnp.float32)
                return dq.at[i].add(dq_i), dk, dv

            return jax.lax.cond(visit_j[i], visit_tile, lambda c: c, carry)

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, nq, q_tile, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros(q_t.shape, jnp.float32)
    dq, (dk_t, dv_t) = jax.lax.scan(kv_tile, dq0, (k_t, v_t, ki_t, visit.T))
    dq = _untiles(dq).reshape(b, tp, n, h).astype(q.dtype)
    return dq, _untiles(dk_t).astype(k.dtype), _untiles(dv_t).astype(v.dtype), None, None


_attention.defvjp(_forward, _backward)
