"""Causal attention in query row blocks, unrolled, with a hand-written VJP: the CPU kernel for training and
full-sequence passes.

Query block i (positions [i * b, (i + 1) * b)) attends to keys [0, (i + 1) * b) only, so the causal upper
triangle is never computed (about half the score work of the dense path), and each block is an ordinary
masked softmax. The blocks are unrolled at trace time, not looped: XLA's CPU runtime then runs independent
blocks on different threads and needs no per-tile control flow, which is where the tiled kernel
(blocked_attention.py, 64 x 64 tiles under `lax.cond`) loses its time on CPU.

Layout: the G query heads that share a kv head are laid out as rows, (B, K, T * G, H) with the rows in
(position, head) order, and the keys as (B, K, H, T). Every product of the forward and the backward is then
a row-major batched matmul (XLA CPU's fast path) whose operands are the small (rows x H) or (H x keys)
arrays transposed once per call, never the (rows x keys) scores. The softmax is normalised on the (rows x
H) output instead of the scores, and the backward folds 1 / l into its small operands the same way, so per
block the scores are written once (unnormalised probabilities, kept for the backward) and the backward
writes one (rows x keys) array (d scores). Autodiff of the same blocks wrote about five such arrays each way
plus transposed copies of two of them. At the benchmark's shape (T 770, 12 query / 2 kv heads of 64),
forward + backward on 2 cores, alternated with torch: 35.6 ms, autodiff's blocks 53.1 ms, torch's fused
SDPA 48.5 ms, the dense path 121.7 ms; in the 12-layer benchmark step the attention went from ~70 to ~45 ms
a layer (what is left is mostly per-operation latency: each block is a dozen small thunks, which is also
why blocks of 128 to 384 positions all ran as fast as 64 in the step; 128 compiles faster).

Memory: the backward keeps each block's probabilities, about T * S * N / 2 floats per layer (the tiled
kernel keeps O(T)); `attention` (impl "rows") sends larger problems to the tiled kernel, and the small
calls that are not causal from slot 0 (vision windows and image blocks, KV-cache steps) to the dense path.
"""

import functools
import math

import jax
import jax.numpy as jnp

from pixel_reasoner_jax.models.layout import own, swap_last

__all__ = ["MAX_SCORES", "ROW_BLOCK", "row_block_attention"]

# Positions per query block. Read at call time; the block grows past it when a sequence would need more than
# MAX_BLOCKS blocks (trace size).
ROW_BLOCK = 128
MAX_BLOCKS = 32
# Score elements of a call (B * N * T * S) above which `attention` takes the tiled kernel instead: 2^27
# floats, 512 MiB for the full squares, about half of it kept per layer for the backward.
MAX_SCORES = 1 << 27

_NEG = float(jnp.finfo(jnp.float32).min)


def row_block_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array, kv_segments: jax.Array
) -> jax.Array:
    """Causal `layers.attention` with query slot t at position t and key slot s at position s (T == S).

    q (B, T, N, H), k / v (B, T, K, H), segments (B, T); returns (B, T, N, H) in q's dtype.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    block = max(ROW_BLOCK, -(-t // MAX_BLOCKS))
    qs = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
    q_rows = qs.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)
    k_t = own(k.transpose(0, 2, 3, 1))  # (B, K, H, T)
    v_k = own(v.transpose(0, 2, 1, 3))  # (B, K, T, H)
    out = _rows(q_rows, k_t, v_k, q_segments, kv_segments, g, block)
    return out.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q.dtype)


def _blocks(t: int, block: int):
    """(first position, end position) per query block; block i sees keys [0, end)."""
    return [(start, min(t, start + block)) for start in range(0, t, block)]


def _visible(q_segments, kv_segments, start, end, g):
    """(B, 1, rows, end) mask of query positions [start, end) (each repeated for its G heads) over keys
    [0, end): same segment and not in the future."""
    pos = jnp.repeat(jnp.arange(start, end), g)
    seg = jnp.repeat(q_segments[:, start:end], g, axis=1)
    ok = (seg[:, :, None] == kv_segments[:, None, :end]) & (
        jnp.arange(end)[None, None, :] <= pos[None, :, None]
    )
    return ok[:, None]


def _mm(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _rows(q_rows, k_t, v_k, q_segments, kv_segments, g, block):
    return _rows_fwd(q_rows, k_t, v_k, q_segments, kv_segments, g, block)[0]


def _rows_fwd(q_rows, k_t, v_k, q_segments, kv_segments, g, block):
    t = k_t.shape[-1]
    outs, probs, sums = [], [], []
    for start, end in _blocks(t, block):
        r0, r1 = start * g, end * g
        s = _mm("BKRH,BKHS->BKRS", q_rows[:, :, r0:r1], k_t[..., :end])
        s = jnp.where(_visible(q_segments, kv_segments, start, end, g), s, _NEG)
        p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        total = jnp.sum(p, axis=-1, keepdims=True)  # >= 1: a row always sees its own key
        p = p.astype(v_k.dtype)
        outs.append(_mm("BKRS,BKSH->BKRH", p, v_k[:, :, :end]) / total)
        probs.append(p)
        sums.append(total)
    out = jnp.concatenate(outs, axis=2)
    return out.astype(q_rows.dtype), (q_rows, k_t, v_k, out, probs, sums)


def _rows_bwd(g, block, res, d_out):
    """With P = p / l the block's probabilities: dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o)),
    dQ = dS K, dK = dS^T Q; each formed so that only small operands are transposed."""
    q_rows, k_t, v_k, out, probs, sums = res
    t = k_t.shape[-1]
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True)  # (B, K, R, 1)
    v_t = swap_last(v_k)  # (B, K, H, T)
    k_k = swap_last(k_t)  # (B, K, T, H)
    q_t = swap_last(q_rows)  # (B, K, H, R)
    dq, dk_t, dv_t = [], jnp.zeros(k_t.shape, jnp.float32), jnp.zeros(k_t.shape, jnp.float32)
    for (start, end), p, total in zip(_blocks(t, block), probs, sums):
        r0, r1 = start * g, end * g
        do_l = (d_out[:, :, r0:r1] / total).astype(v_k.dtype)  # 1 / l on the (rows x H) side
        dp = _mm("BKRH,BKHS->BKRS", do_l, v_t[..., :end])
        ds = (p * (dp - delta[:, :, r0:r1] / total)).astype(q_rows.dtype)
        dq.append(_mm("BKRS,BKSH->BKRH", ds, k_k[:, :, :end]))
        pad = ((0, 0), (0, 0), (0, 0), (0, t - end))
        dk_t = dk_t + jnp.pad(_mm("BKHR,BKRS->BKHS", q_t[..., r0:r1], ds), pad)
        dv_t = dv_t + jnp.pad(_mm("BKHR,BKRS->BKHS", swap_last(do_l), p), pad)
    dq = jnp.concatenate(dq, axis=2).astype(q_rows.dtype)
    return dq, dk_t.astype(k_t.dtype), swap_last(dv_t).astype(v_k.dtype), None, None


_rows.defvjp(_rows_fwd, _rows_bwd)
