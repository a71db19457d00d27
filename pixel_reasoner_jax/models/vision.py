"""Qwen2.5-VL vision tower (HF Qwen2_5_VisionTransformerPretrainedModel) and its host-side input builder.

`prepare_vision` turns one sample's grids into static-shape index arrays once on the host (window
permutation, 2-D rotary ids, window / frame segments, padding to a patch bucket) and `stack_vision` stacks
samples on a leading batch axis; the jitted tower only gathers and masks. The tower runs per sample (its
batch axis is sharded like the token batch), so no attention ever spans two samples and each device
encodes the images of its own sequences. Window blocks attend inside gathered (windows, 64) batches, so
their cost is O(P * 64), not O(P^2). Full blocks attend inside gathered (slots, L) batches: each image
(each frame slice of a video) lies whole in one slot of L rows, several small ones may share a slot
(told apart by segment ids), and the padding rows of the bucket are in none. Their cost is slots * L^2,
about the sum of the squared image sizes, where attention over the whole bucket would cost Pb^2 (a 7B GRPO
sample of eight 88 x 88-patch images and one of 3,584 patches in a 65,536-row bucket: 12 slots of 8,192
rows, 0.19 of it).
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_reasoner_jax.models.config import VisionConfig
from pixel_reasoner_jax.models.layers import (
    Linear,
    RMSNorm,
    apply_rotary,
    attention,
    constrain,
    layer_slice,
    remat,
)

# Tile side of the blocked kernel in the full-attention slots on GPU (the model's attention "cudnn" or
# "xla"). Its CPU tiles (64 x 64, blocked_attention.BLOCK_Q) make an 8,192-row slot 16,384 loop steps of
# a few small kernels each (and a `lax.cond`, whose flag XLA's GPU runtime may read on the host), and on
# an H200 that loop, not the FLOPs, set the time: the 7B tower's forward over two samples of 65,536 patch
# rows took 5.15 s (4.6 % MFU) and 3B GRPO's step 19 s (3.1 %), benchmarks/DEVICE.md. 512 x 512 tiles take
# 64x fewer steps, each a (slots x heads) batch of 512 x 512 products. Chosen by that arithmetic; not yet
# timed on a GPU.
GPU_FULL_ATTENTION_TILE = 512

__all__ = [
    "Qwen25VisionTower",
    "VisionInputs",
    "pad_slots",
    "pad_windows",
    "prepare_vision",
    "slice_sizes",
    "slot_bucket",
    "slot_length",
    "stack_vision",
    "vision_rotary",
]

VISION_NORM_EPS = 1e-6  # hard-coded in HF for every vision norm, independent of the text rms_norm_eps
# Vision activations (B, rows, width): samples split like the token batch, so a device encodes its own.
VISION_ACT = ("act_batch", "act_patches", "act_embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Static-shape index arrays of one sample's vision items (all NumPy on the host, jit arguments later).

    Rows are "patch rows" of `pixel_values` (C = 1176 values each), P = real patches, Pb = bucket.
    "Window order" is HF's window permutation; padding rows sit after the real ones. The shapes below are
    one sample's (`prepare_vision`); the tower takes them stacked on a leading batch axis B
    (`stack_vision`), every index staying local to its sample.

    Attributes:
      perm: (Pb,) window-order row -> input row.
      pos_hw: (Pb, 2) 2-D rotary (h, w) ids in window order (0 for padding).
      full_segments: (Pb,) frame-slice id in window order (1-based; 0 = padding, its own segment).
      slot_gather: (S, L) window-order row gathered into each full-attention slot position.
      slot_segments: (S, L) frame-slice id of each slot position; an empty position has its own negative id
        (it sees only itself, so the blocked kernel skips its tiles off the diagonal).
      slot_scatter: (Pb,) flat slot position (slot * L + j) holding each window-order row; padding rows
        point past the last slot (S * L, a zero row: they are in no slot).
      window_gather: (W, Lw) window-order row gathered into each window slot (Lw = 64 patches).
      window_segments: (W, Lw) 1 for a filled slot, 0 for an empty one.
      window_scatter: (Pb,) flat slot (window * Lw + j) holding each window-order row.
      merge_unpermute: (Mb,) merged row in placeholder order -> merged row in window order.
      valid: (Pb,) True for real rows, in input-row order.
      num_patches, num_merged: () real patch rows P and merged rows M = P / merge^2.
    """

    perm: np.ndarray
    pos_hw: np.ndarray
    full_segments: np.ndarray
    slot_gather: np.ndarray
    slot_segments: np.ndarray
    slot_scatter: np.ndarray
    window_gather: np.ndarray
    window_segments: np.ndarray
    window_scatter: np.ndarray
    merge_unpermute: np.ndarray
    valid: np.ndarray
    num_patches: np.ndarray
    num_merged: np.ndarray


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def slot_bucket(n: int) -> int:
    """The smallest 2^k or 3 * 2^(k-1) >= n (>= 1): full-attention slot lengths and counts. Buckets 1.33x
    apart keep the compile count small and a shape at most 1/3 over its need (1, 2, 3, 4, 6, 8, 12, ...)."""
    p = _next_pow2(n)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def slice_sizes(grid_thw) -> list[int]:
    """Patch rows of each full-attention segment of `grid_thw`: one per image, one per video frame slice."""
    return [
        int(h * w) for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3).tolist() for _ in range(t)
    ]


def slot_length(grids: Sequence, patch_bucket: int) -> int:
    """The full-attention slot length of samples with these (I, 3) grids at `patch_bucket`: `slot_bucket` of
    their largest image / frame slice, at most the bucket (batches that stack share one)."""
    return min(patch_bucket, slot_bucket(max((max(slice_sizes(g), default=1) for g in grids), default=1)))


def _pack_slots(sizes: Sequence[int], slot_len: int) -> list[list[int]]:
    """Segment indices per slot: first fit, largest segment first (each segment whole in one slot)."""
    slots: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = next((j for j, f in enumerate(free) if f >= sizes[i]), None)
        if j is None:
            slots.append([])
            free.append(slot_len)
            j = len(slots) - 1
        slots[j].append(i)
        free[j] -= sizes[i]
    return slots


def prepare_vision(
    grid_thw,
    cfg: VisionConfig,
    *,
    patch_bucket: int | None = None,
    window_bucket: int | None = None,
    slot_len: int | None = None,
    num_slots: int | None = None,
) -> VisionInputs:
    """Index arrays of one tower call over the vision items `grid_thw` (images and videos alike).

    Args:
      grid_thw: (I, 3) (t, h, w) patch grids, in the order their rows appear in `pixel_values` and their
        placeholders in the (flattened) token sequence.
      cfg: the vision config.
      patch_bucket: pad the patch rows to this many (>= P, a multiple of merge^2); None = exactly P.
      window_bucket: number of attention windows to pad to; None = the next power of two of the need.
      slot_len: rows per full-attention slot (>= the largest image / frame slice); None = `slot_bucket` of
        the largest, at most the patch bucket. A batch shares one (`processing.batch.pack_vision`).
      num_slots: full-attention slots to pad to; None = `slot_bucket` of the need.

    Raises:
      ValueError: malformed grids or buckets too small.
    """
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = cfg.spatial_merge_size
    mu = m * m
    vws = cfg.window_size // m // cfg.patch_size  # window side in merged units
    lw_slots = vws * vws * mu
    if (grids <= 0).any() or (grids[:, 1:] % m).any():
        raise ValueError(f"grid_thw must be positive with h, w multiples of {m}, got {grids.tolist()}")
    units, win_sizes, pos, segs = [], [], [], []
    unit_off = 0
    slice_id = 0
    for gt, gh, gw in grids.tolist():
        lh, lw = gh // m, gw // m
        nwh, nww = -(-lh // vws), -(-lw // vws)
        padded = np.full((gt, nwh * vws, nww * vws), -1, np.int64)
        padded[:, :lh, :lw] = np.arange(gt * lh * lw).reshape(gt, lh, lw)
        windows = padded.reshape(gt, nwh, vws, nww, vws).transpose(0, 1, 3, 2, 4).reshape(-1, vws * vws)
        counts = (windows >= 0).sum(1)
        flat = windows.reshape(-1)
        units.append(flat[flat >= 0] + unit_off)
        win_sizes.extend((counts[counts > 0] * mu).tolist())
        # Rows arrive merge-block-major: blocks in raster order, the m x m patches of a block in raster.
        hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        hh = hh.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        pos.append(np.tile(np.stack([hh, ww], -1), (gt, 1)))
        segs.append(np.repeat(np.arange(slice_id + 1, slice_id + gt + 1), gh * gw))
        slice_id += gt
        unit_off += gt * lh * lw
    unit_perm = np.concatenate(units) if units else np.zeros((0,), np.int64)
    n_p = int(unit_perm.size * mu)
    pb = n_p if patch_bucket is None else int(patch_bucket)
    if pb < n_p or pb % mu:
        raise ValueError(f"patch_bucket {patch_bucket} must be >= {n_p} patches and a multiple of {mu}")
    perm = np.concatenate([(unit_perm[:, None] * mu + np.arange(mu)).reshape(-1), np.arange(n_p, pb)])
    pos_all = np.concatenate(pos + [np.zeros((pb - n_p, 2), np.int64)])[perm]
    seg_all = np.concatenate(segs + [np.zeros((pb - n_p,), np.int64)])[perm]
    # Padding rows fill their own windows (never mixed with real rows).
    pad_windows = -(-(pb - n_p) // lw_slots)
    sizes = (
        win_sizes
        + [lw_slots] * (pad_windows - 1)
        + ([pb - n_p - lw_slots * (pad_windows - 1)] if pad_windows else [])
    )
    need = max(1, len(sizes))
    nw = _next_pow2(need) if window_bucket is None else int(window_bucket)
    if nw < need:
        raise ValueError(f"window_bucket {window_bucket} is smaller than the {need} windows needed")
    gather = np.zeros((nw, lw_slots), np.int64)
    wseg = np.zeros((nw, lw_slots), np.int64)
    scatter = np.zeros((pb,), np.int64)
    start = 0
    for i, s in enumerate(sizes):
        gather[i, :s] = start + np.arange(s)
        wseg[i, :s] = 1
        scatter[start : start + s] = i * lw_slots + np.arange(s)
        start += s
    ls = slot_length([grids], pb) if slot_len is None else int(slot_len)
    slot_gather, slot_segments, slot_scatter = _slot_layout(seg_all, slice_sizes(grids), pb, ls, num_slots)
    mb = pb // mu
    unpermute = np.concatenate([np.argsort(unit_perm, kind="stable"), np.arange(unit_perm.size, mb)])
    valid = np.arange(pb) < n_p
    i32 = lambda a: np.asarray(a, np.int32)
    return VisionInputs(
        perm=i32(perm),
        pos_hw=i32(pos_all),
        full_segments=i32(seg_all),
        slot_gather=i32(slot_gather),
        slot_segments=i32(slot_segments),
        slot_scatter=i32(slot_scatter),
        window_gather=i32(gather),
        window_segments=i32(wseg),
        window_scatter=i32(scatter),
        merge_unpermute=i32(unpermute),
        valid=valid,
        num_patches=np.asarray(n_p, np.int32),
        num_merged=np.asarray(n_p // mu, np.int32),
    )


def _slot_layout(seg_all: np.ndarray, sizes: list[int], pb: int, ls: int, num_slots: int | None):
    """(gather (S, L), segments (S, L), scatter (Pb,)) of the full-attention slots (`VisionInputs`) of length
    `ls` for the window-order segment ids `seg_all` (1-based frame slices of `sizes` rows, 0 = padding)."""
    big = max(sizes, default=1)
    if ls < big:
        raise ValueError(f"slot_len {ls} is smaller than the largest image / frame slice ({big} patches)")
    slots = _pack_slots(sizes, ls)
    need = max(1, len(slots))
    ns = slot_bucket(need) if num_slots is None else int(num_slots)
    if ns < need:
        raise ValueError(f"num_slots {num_slots} is smaller than the {need} slots needed")
    order = np.argsort(seg_all, kind="stable")  # window-order rows grouped by segment, padding first
    starts = np.concatenate([[0], np.cumsum(np.bincount(seg_all, minlength=len(sizes) + 1))])
    gather = np.zeros((ns, ls), np.int64)
    segments = -1 - np.arange(ns * ls, dtype=np.int64).reshape(ns, ls)
    scatter = np.full((pb,), ns * ls, np.int64)
    for j, members in enumerate(slots):
        at = 0
        for i in members:
            rows = order[starts[i + 1] : starts[i + 2]]
            gather[j, at : at + rows.size] = rows
            segments[j, at : at + rows.size] = i + 1
            scatter[rows] = j * ls + at + np.arange(rows.size)
            at += rows.size
    return gather, segments, scatter


def pad_slots(vi: VisionInputs, num_slots: int) -> VisionInputs:
    """The same inputs with `num_slots` full-attention slots; the added slots are empty (nothing reads them;
    the padding rows' scatter index moves to the new end). One sample's inputs or stacked ones.

    Raises:
      ValueError: fewer slots than `vi` already has.
    """
    ns, ls = vi.slot_gather.shape[-2:]
    if num_slots < ns:
        raise ValueError(f"pad_slots: num_slots {num_slots} is smaller than the {ns} slots present")
    widths = [(0, 0)] * (vi.slot_gather.ndim - 2) + [(0, num_slots - ns), (0, 0)]
    empty = -1 - np.arange(ns * ls, num_slots * ls, dtype=np.int64).reshape(num_slots - ns, ls)
    segments = np.concatenate(
        [vi.slot_segments, np.broadcast_to(empty, (*vi.slot_segments.shape[:-2], *empty.shape))], axis=-2
    )
    scatter = np.where(vi.slot_scatter == ns * ls, num_slots * ls, vi.slot_scatter)
    return dataclasses.replace(
        vi,
        slot_gather=np.pad(vi.slot_gather, widths),
        slot_segments=segments.astype(vi.slot_segments.dtype),
        slot_scatter=scatter.astype(vi.slot_scatter.dtype),
    )


def pad_windows(vi: VisionInputs, num_windows: int) -> VisionInputs:
    """The same inputs with `num_windows` attention windows; the added windows are empty (nothing reads them).

    Works on one sample's inputs and on stacked ones (the window axis is the second to last).

    Raises:
      ValueError: fewer windows than `vi` already has.
    """
    w = vi.window_gather.shape[-2]
    if num_windows < w:
        raise ValueError(f"pad_windows: num_windows {num_windows} is smaller than the {w} windows present")
    widths = [(0, 0)] * (vi.window_gather.ndim - 2) + [(0, num_windows - w), (0, 0)]
    return dataclasses.replace(
        vi,
        window_gather=np.pad(vi.window_gather, widths),
        window_segments=np.pad(vi.window_segments, widths),
    )


def stack_vision(
    samples: Sequence[VisionInputs], num_windows: int | None = None, num_slots: int | None = None
) -> VisionInputs:
    """One sample's `prepare_vision` outputs per batch row, stacked on a leading axis B.

    Args:
      samples: per-sample inputs, all at one patch bucket and slot length.
      num_windows: windows per sample after padding (None = the largest sample's count).
      num_slots: full-attention slots per sample after padding (None = the largest sample's count).

    Raises:
      ValueError: no samples, or samples at different patch buckets or slot lengths.
    """
    if not samples:
        raise ValueError("stack_vision needs at least one sample, got none")
    buckets = [v.perm.shape[0] for v in samples]
    if len(set(buckets)) > 1:
        raise ValueError(f"stack_vision: samples have different patch buckets {buckets}; use one bucket")
    lengths = [v.slot_gather.shape[1] for v in samples]
    if len(set(lengths)) > 1:
        raise ValueError(f"stack_vision: samples have different slot lengths {lengths}; use one slot_len")
    w = max(v.window_gather.shape[0] for v in samples) if num_windows is None else num_windows
    ns = max(v.slot_gather.shape[0] for v in samples) if num_slots is None else num_slots
    padded = [pad_slots(pad_windows(v, w), ns) for v in samples]
    return jax.tree.map(lambda *xs: np.stack(xs), *padded)


def vision_rotary(pos_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (..., P, head_dim) float32 of the axial 2-D rotary of (..., P, 2) ids: [h, w freqs] twice."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    angles = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # (..., P, 2, head_dim / 4)
    angles = angles.reshape(*angles.shape[:-2], -1)  # [h..., w...]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _act(name: str):
    if name != "silu":
        raise ValueError(f"unsupported hidden_act {name!r}: Qwen2.5-VL uses 'silu'")
    return jax.nn.silu


class PatchEmbed(nnx.Module):
    """HF Qwen2_5_VisionPatchEmbed: the stride = kernel Conv3d as one matmul over flattened patch rows."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = Linear(
            (cfg.patch_dim,),
            (cfg.hidden_size,),
            names=("vit_patch", "vit_embed"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )


class VisionAttention(nnx.Module):
    """HF Qwen2_5_VLVisionAttention (stacked over blocks): fused qkv, 2-D rotary, block-diagonal softmax."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, n = cfg.hidden_size, cfg.depth
        kw = dict(num_layers=n, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear((e,), (3 * e,), names=("vit_embed", "vit_qkv"), bias_names=("vit_qkv",), **kw)
        self.proj = Linear((e,), (e,), names=("vit_heads_out", "vit_embed"), bias_names=("vit_embed",), **kw)
        self.num_heads = cfg.num_heads


class VisionMLP(nnx.Module):
    """HF Qwen2_5_VLMLP with bias: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(num_layers=cfg.depth, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear((e,), (f,), names=("vit_embed", "vit_mlp"), bias_names=("vit_mlp",), **kw)
        self.up_proj = Linear((e,), (f,), names=("vit_embed", "vit_mlp"), bias_names=("vit_mlp",), **kw)
        self.down_proj = Linear((f,), (e,), names=("vit_mlp", "vit_embed"), bias_names=("vit_embed",), **kw)
        self.act = _act(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlocks(nnx.Module):
    """All HF Qwen2_5_VLVisionBlock layers, parameters stacked on a leading `layers` axis."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e = cfg.hidden_size
        kw = dict(eps=VISION_NORM_EPS, names=("vit_embed",), num_layers=cfg.depth, param_dtype=param_dtype)
        self.norm1 = RMSNorm(e, **kw)
        self.norm2 = RMSNorm(e, **kw)
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def layer(self, x, cos, sin, vi: VisionInputs, is_full, impl: str):
        """One block over (B, Pb, E) rows (called on a single layer's slice; `is_full` a traced flag inside the
        scan, a bool when the layers are unrolled)."""
        b, pb, e = x.shape
        n = self.attn.num_heads
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, pb, 3, n, e // n)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # HF applies the vision rotary in float32 and casts back.
        q = apply_rotary(q.astype(jnp.float32), cos[:, :, None], sin[:, :, None]).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos[:, :, None], sin[:, :, None]).astype(x.dtype)

        def full(q, k, v):
            # Each image's rows attend inside their slot (segment ids tell a slot's images apart). cuDNN /
            # XLA take segments only as a dense (slots, 1, L, L) bias, 256 MiB per 8,192-row slot and
            # layer: the blocked kernel keeps O(L) memory and skips the tiles between a slot's images, in
            # GPU-sized tiles there (GPU_FULL_ATTENTION_TILE).
            full_impl, blocks = impl, {}
            if impl in ("cudnn", "xla"):
                tile = GPU_FULL_ATTENTION_TILE
                full_impl, blocks = "blocked", dict(block_q=tile, block_k=tile)
            return _slotted(
                q, k, v, vi.slot_gather, vi.slot_segments, vi.slot_scatter, full_impl, True, **blocks
            )

        def windowed(q, k, v):
            return _slotted(q, k, v, vi.window_gather, vi.window_segments, vi.window_scatter, impl)

        if isinstance(is_full, bool):  # unrolled layers: the kind is static
            out = (full if is_full else windowed)(q, k, v)
        else:
            out = jax.lax.cond(is_full, full, windowed, q, k, v)
        x = x + self.attn.proj(out.reshape(b, pb, e))
        x = x + self.mlp(self.norm2(x))
        return constrain(x, VISION_ACT)


def _slotted(q, k, v, gather, segments, scatter, impl: str, spare_row: bool = False, **blocks) -> jax.Array:
    """Attention inside slots: (B, Pb, N, H) rows gathered into (B * S, L) slot batches by `gather` (B, S, L),
    masked by `segments` (B, S, L), and each row read back from its slot position `scatter` (B, Pb). With
    `spare_row`, position S * L reads zeros (rows in no slot). `blocks`: the kernel's tile sizes."""
    b, ns, ls = gather.shape
    flat = gather.reshape(b, ns * ls)

    def take(a):  # (B, Pb, N, H) -> (B * S, L, N, H): every slot of every sample is a row
        return _rows(a, flat).reshape(b * ns, ls, *a.shape[2:])

    seg = segments.reshape(b * ns, ls)
    out = attention(
        take(q), take(k), take(v), q_segments=seg, kv_segments=seg, causal=False, impl=impl, **blocks
    )
    out = out.reshape(b, ns * ls, *out.shape[2:])
    if spare_row:
        out = jnp.concatenate([out, jnp.zeros_like(out[:, :1])], axis=1)
    return _rows(out, scatter)


def _rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for every sample b: (B, R, ...) rows gathered by (B, K) indices -> (B, K, ...)."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


class PatchMerger(nnx.Module):
    """HF Qwen2_5_VLPatchMerger: RMSNorm per patch, 2x2 patches concatenated, Linear-GELU-Linear."""

    def __init__(self, cfg: VisionConfig, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        e4 = cfg.hidden_size * cfg.merge_unit
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_q = RMSNorm(
            cfg.hidden_size, eps=VISION_NORM_EPS, names=("vit_embed",), param_dtype=param_dtype
        )
        self.mlp_0 = Linear(
            (e4,), (e4,), names=("vit_merge", "vit_merge_out"), bias_names=("vit_merge_out",), **kw
        )
        self.mlp_2 = Linear((e4,), (out_dim,), names=("vit_merge_out", "embed"), bias_names=("embed",), **kw)
        self.unit = cfg.merge_unit

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., Pb, E) patch rows -> (..., Pb / merge^2, out_dim)."""
        x = self.ln_q(x).reshape(*x.shape[:-2], x.shape[-2] // self.unit, -1)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class Qwen25VisionTower(nnx.Module):
    """HF Qwen2_5_VisionTransformerPretrainedModel: pixel patch rows -> one row per LLM visual token."""

    def __init__(
        self,
        cfg: VisionConfig,
        out_dim: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        attention: str = "dense",
        layer_loop: str = "scan",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.remat = remat
        self.attention = attention
        self.layer_loop = layer_loop
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.blocks = VisionBlocks(cfg, **kw)
        self.merger = PatchMerger(cfg, out_dim, **kw)
        self.full_flags = tuple(i in cfg.fullatt_block_indexes for i in range(cfg.depth))

    def __call__(self, pixel_values: jax.Array, vi: VisionInputs) -> jax.Array:
        """Merged rows (B, Mb, out_dim) per sample in placeholder order; rows past `vi.num_merged[b]` pad.

        Args:
          pixel_values: (B, Pb, C) each sample's patch rows (padding rows arbitrary, e.g. zeros).
          vi: `stack_vision` of the samples' `prepare_vision` outputs at bucket Pb.
        """
        cfg = self.cfg
        x = self.patch_embed.proj(constrain(_rows(pixel_values, vi.perm), VISION_ACT))
        x = constrain(x, VISION_ACT)
        cos, sin = vision_rotary(vi.pos_hw, cfg.head_dim, cfg.rope_theta)
        graphdef, state = nnx.split(self.blocks)
        impl = self.attention

        def body(x, xs):
            layer_state, is_full = xs
            return nnx.merge(graphdef, layer_state).layer(x, cos, sin, vi, is_full, impl), None

        if self.layer_loop == "unroll":
            # Each layer's kind is known here: no cond, a window layer's program holds no full attention.
            for i, is_full in enumerate(self.full_flags):
                x, _ = remat(lambda x, s, f=is_full: body(x, (s, f)), self.remat)(x, layer_slice(state, i))
        else:
            x, _ = jax.lax.scan(remat(body, self.remat), x, (state, jnp.asarray(self.full_flags)))
        merged = self.merger(x)
        return constrain(_rows(merged, vi.merge_unpermute), VISION_ACT)
