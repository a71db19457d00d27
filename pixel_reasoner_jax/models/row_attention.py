"""Causal attention in query row blocks, unrolled: the CPU kernel for training and full-sequence passes.

Query block i (rows [i * b, (i + 1) * b)) attends to keys [0, (i + 1) * b) only, so the causal upper
triangle is never computed (about half the score work of the dense path), and each block is an ordinary
masked softmax. The blocks are unrolled at trace time, not looped: XLA's CPU runtime then runs independent
blocks on different threads and needs no per-tile control flow, which is where the tiled kernel
(blocked_attention.py, 64 x 64 tiles under `lax.cond`) loses its time on CPU. Measured on 2 cores at the
benchmark's shape (T 770, 12 query / 2 kv heads of 64, forward + backward): 35 ms against the tiled
kernel's 149 ms, the dense path's 84 ms and PyTorch's fused SDPA's 23 ms.

Memory: the backward keeps each block's probabilities, about T * S * N / 2 floats per layer (the tiled
kernel keeps O(T)); `attention` (impl "rows") sends larger problems to the tiled kernel, and the small
calls that are not causal from slot 0 (vision windows and image blocks, KV-cache steps) to the dense path.
"""

import math

import jax
import jax.numpy as jnp

__all__ = ["MAX_SCORES", "ROW_BLOCK", "row_block_attention"]

# Rows per query block (64 beat 128 and 256 at the benchmark's shape, forward + backward). Read at call
# time; the block grows past it when a sequence would need more than MAX_BLOCKS blocks (trace size).
ROW_BLOCK = 64
MAX_BLOCKS = 32
# Score elements of a call (B * N * T * S) above which `attention` takes the tiled kernel instead: 2^27
# floats, 512 MiB for the full squares, about half of it kept per layer for the backward.
MAX_SCORES = 1 << 27


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
    qs = (q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)).reshape(b, t, kh, g, h)
    outs = []
    for start in range(0, t, block):
        end = min(t, start + block)
        s = jnp.einsum("BTKGH,BSKH->BKGTS", qs[:, start:end], k[:, :end], preferred_element_type=jnp.float32)
        visible = (q_segments[:, start:end, None] == kv_segments[:, None, :end]) & (
            jnp.arange(end)[None, None, :] <= jnp.arange(start, end)[None, :, None]
        )
        s = jnp.where(visible[:, None, None], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("BKGTS,BSKH->BTKGH", p, v[:, :end]))
    return jnp.concatenate(outs, axis=1).reshape(b, t, n, h).astype(q.dtype)
