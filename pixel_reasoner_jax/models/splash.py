"""TPU splash attention (the Pallas kernel in `jax.experimental.pallas.ops.tpu.splash_attention`) behind the
model's segment-attention interface: a static causal or full mask and-ed with per-token segment ids.

What the kernel sees: per batch row, q (N, T, H) pre-scaled by 1/sqrt(H), k / v (K, S, H) (grouped-query
attention natively), and `SegmentIds` (T,) / (S,). T and S are padded to whole tiles with a segment id no
real token uses, so padded queries see only padded keys and real queries never see them. The static mask
decides which (query tile, key tile) pairs run at all: the causal triangle is skipped, but tiles that only
segment ids mask (another image's block in a full-attention vision layer, padding) still run, unlike the
blocked kernel, which skips them; memory stays O(T) either way. Masks with per-call positions (the KV
cache) are not static: `layers.attention` sends those calls to the blocked kernel.

Platform: the Mosaic kernel when the program is lowered for TPU (also ahead of time from a CPU host), the
same kernel in Pallas interpret mode anywhere else (CPU tests); `lax.platform_dependent` picks at
lowering time, so nothing here asks which backend is the default. Under a device mesh the kernel runs in
`shard_map` over the batch (data / fsdp) and head (tensor) axes of the active logical rules, each axis
only where it divides the array; a Pallas call is opaque to XLA's partitioner.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from pixel_reasoner_jax.sharding import logical_to_spec

__all__ = ["splash_attention"]

# Tile edge for queries and keys, forward and backward (the kernel needs multiples of 128). Sequences are
# padded to a multiple of min(BLOCK, T rounded up to 128). Read at call time, so tests can change it.
BLOCK = 512
LANES = 128
# Segment id of the padding this module adds: no caller uses it (the model's ids are >= 0).
PAD_SEGMENT = np.iinfo(np.int32).min


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array,
    kv_segments: jax.Array,
    *,
    causal: bool,
    block: int | None = None,
    fused_backward: bool = False,
) -> jax.Array:
    """`layers.attention` with default positions (key j visible to query i iff the segment ids match, and
    j <= i when causal): q (B, T, N, H), k / v (B, S, K, H), segments (B, T) / (B, S); returns (B, T, N, H)
    in q's dtype. `block` overrides BLOCK (a multiple of 128).

    `fused_backward`: one backward kernel for dq, dk and dv, which forms each tile's scores once (5 matmuls
    per tile, against 7 in the separate dq and dk/dv kernels) and writes dq unreduced, one partial per key
    tile ((S / tile) x q's size, summed after the kernel): fewer FLOPs for a transient buffer."""
    block = block or BLOCK
    if block % LANES:
        raise ValueError(f"splash attention: block must be a multiple of {LANES}, got {block}")
    local = functools.partial(_padded, causal=causal, block=block, fused=fused_backward)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, q_segments, kv_segments)
    batch_axes, head_axes = _mesh_axes(mesh, q.shape[0], (q.shape[2], k.shape[2]))
    act, seg = P(batch_axes, None, head_axes, None), P(batch_axes, None)
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(act, act, act, seg, seg), out_specs=act, check_vma=False
    )
    return sharded(q, k, v, q_segments, kv_segments)


def _mesh_axes(mesh, batch: int, heads: tuple[int, ...]):
    """Mesh axes of the logical batch and head axes, each dropped (replicated) where it does not divide."""
    spec = logical_to_spec(("act_batch", "act_heads"))

    def fit(axes, sizes):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n = math.prod(mesh.shape[a] for a in names)
        return axes if names and all(s % n == 0 for s in sizes) else None

    return fit(spec[0], (batch,)), fit(spec[1], heads)


def _padded(q, k, v, q_segments, kv_segments, *, causal, block, fused):
    """One device's share: pad T and S to whole tiles, run the kernel per batch row, drop the padding."""
    b, t, n, h = q.shape
    s = k.shape[1]
    bq, tp = _tiles(t, block)
    bk, sp = _tiles(s, block)

    def pad(x, to, value=0):
        return jnp.pad(x, ((0, 0), (0, to - x.shape[1])) + ((0, 0),) * (x.ndim - 2), constant_values=value)

    # (B, T, N, H) -> (B, N, T, H): the kernel's head-major layout. Scaling q first is how the kernel takes
    # a softmax scale (it has no scale argument); in bf16 that adds one rounding of q.
    q = jnp.swapaxes(pad(q * jnp.asarray(1.0 / math.sqrt(h), q.dtype), tp), 1, 2)
    k, v = (jnp.swapaxes(pad(x, sp), 1, 2) for x in (k, v))
    segments = sa.SegmentIds(
        q=pad(q_segments.astype(jnp.int32), tp, PAD_SEGMENT),
        kv=pad(kv_segments.astype(jnp.int32), sp, PAD_SEGMENT),
    )
    kernel = functools.partial(_kernel, (n, tp, sp), causal, bq, bk, fused)
    per_row = jax.vmap(lambda *xs: jax.lax.platform_dependent(*xs, tpu=kernel(False), default=kernel(True)))
    out = per_row(q, k, v, segments)
    return jnp.swapaxes(out, 1, 2)[:, :t]


def _tiles(length: int, block: int) -> tuple[int, int]:
    """(tile, padded length): tile = min(block, length rounded up to 128), length rounded up to the tile."""
    tile = min(block, -(-length // LANES) * LANES)
    return tile, -(-length // tile) * tile


def _kernel(shape: tuple[int, int, int], causal: bool, bq: int, bk: int, fused: bool, interpret: bool):
    """The splash kernel for (N heads, T, S). Built per trace: it holds its mask tables as arrays of the
    trace; the NumPy work behind them (quadratic in T) is cached by the library per mask and tile."""
    n, t, s = shape
    head = sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))
    sizes = sa.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=None if fused else bq,
        block_kv_dq=None if fused else bk,
        use_fused_bwd_kernel=fused,
    )
    return sa.make_splash_mha_single_device(
        sa.MultiHeadMask([head] * n), block_sizes=sizes, interpret=interpret
    )
