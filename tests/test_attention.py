"""Blocked attention (models/blocked_attention.py) and TPU splash attention (models/splash.py, in Pallas
interpret mode here) equal the dense masked softmax in values and gradients for every mask the model builds;
blocked really skips fully masked tiles; `resolve_attention` picks kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.models import layers, row_attention
from pixel_reasoner_jax.models.blocked_attention import blocked_attention
from pixel_reasoner_jax.models.layers import ATTENTION_IMPLS, attention, resolve_attention


def _seg(*runs):
    """(1, sum) int32 segment ids from (id, length) runs."""
    return np.concatenate([np.full(n, i, np.int32) for i, n in runs])[None]


# name: (B, T, S, N, K, causal, q_segments, kv_segments, q_positions, kv_positions); tiles are 8 x 8, so
# every case spans several query and key tiles, ragged at the end.
S_CACHE = 29
CASES = {
    # Text batch: right padding (segment 0 after the real tokens) in one row, left padding in the other.
    "causal_padding_gqa": (2, 37, 37, 4, 2, True, np.r_[_seg((1, 30), (0, 7)), _seg((0, 5), (1, 32))], None, None, None),
    # Vision full attention: block-diagonal images / frames and a padding segment, no causality.
    "vision_blocks": (1, 40, 40, 4, 4, False, _seg((1, 10), (2, 7), (3, 12), (4, 3), (0, 8)), None, None, None),
    # Vision windows: the window axis is the batch, slots past the window's size are segment 0.
    "vision_windows": (3, 16, 16, 2, 2, False, np.r_[_seg((1, 16)), _seg((1, 11), (0, 5)), _seg((1, 3), (0, 13))], None, None, None),
    # KV-cache decode: one query at slot 19 of a 29-slot cache whose slots >= 20 are not written yet.
    "decode_t1": (2, 1, S_CACHE, 4, 2, True, np.ones((2, 1), np.int32), (np.arange(S_CACHE) < 20)[None].repeat(2, 0), np.full((2, 1), 19), np.arange(S_CACHE)[None].repeat(2, 0)),
    # Cached prefill of a second turn: 6 queries at slots 14..19 over the same cache.
    "cache_prefill": (1, 6, S_CACHE, 4, 1, True, np.ones((1, 6), np.int32), (np.arange(S_CACHE) < 20)[None], 14 + np.arange(6)[None], np.arange(S_CACHE)[None]),
}  # fmt: skip


def _inputs(case, seed=0):
    b, t, s, n, k, causal, q_seg, kv_seg, q_pos, kv_pos = case
    rng = np.random.default_rng(seed)
    arrays = [
        rng.standard_normal(shape).astype(np.float32) for shape in ((b, t, n, 8), (b, s, k, 8), (b, s, k, 8))
    ]
    as_i32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    kw = dict(
        q_segments=as_i32(q_seg),
        kv_segments=as_i32(q_seg if kv_seg is None else kv_seg),
        causal=causal,
        q_positions=as_i32(q_pos),
        kv_positions=as_i32(kv_pos),
    )
    return [jnp.asarray(a) for a in arrays], kw


TILES = {"blocked": {"block_q": 8, "block_k": 8}, "splash": {"block": 128}, "splash_fused": {"block": 128}}


def _value_and_grads(impl, qkv, kw, cot):
    def loss(q, k, v):
        out = attention(q, k, v, impl=impl, **kw, **TILES.get(impl, {}))
        return jnp.sum(cot * out), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv)


def _check_equals_dense(impl, case):
    """Outputs and the gradients of a random projection of them, 1e-5 relative to each array's scale."""
    qkv, kw = _inputs(case)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(qkv[0].shape), jnp.float32)
    (_, want), want_g = _value_and_grads("dense", qkv, kw, cot)
    (_, got), got_g = _value_and_grads(impl, qkv, kw, cot)
    assert got.shape == want.shape and got.dtype == want.dtype
    for a, b in zip((got, *got_g), (want, *want_g)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("name", list(CASES))
def test_blocked_equals_dense(name):
    _check_equals_dense("blocked", CASES[name])


@pytest.mark.parametrize("name", list(CASES))
def test_rows_equals_dense(name, monkeypatch):
    """Row blocks of 8 (the causal case spans five, ragged at the end); the other cases (no causality, or
    explicit cache positions) take the dense path."""
    monkeypatch.setattr(row_attention, "ROW_BLOCK", 8)
    _check_equals_dense("rows", CASES[name])


@pytest.mark.parametrize("name", list(CASES))
def test_xla_equals_dense(name):
    """`jax.nn.dot_product_attention` (the "xla" implementation; "cudnn" is the same call on a GPU)."""
    _check_equals_dense("xla", CASES[name])


def test_causal_from_slot_0_hands_causality_to_the_kernel(monkeypatch):
    """A causal call without cache positions passes `is_causal=True` and a mask of segments only (cuDNN
    then skips the tiles above the diagonal instead of running them under a dense mask); cache calls keep
    causality in the mask."""
    calls = []
    original = jax.nn.dot_product_attention

    def spy(*args, mask=None, is_causal=False, **kw):
        calls.append((np.asarray(mask), is_causal))
        return original(*args, mask=mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    for name in ("causal_padding_gqa", "cache_prefill", "vision_blocks"):
        qkv, kw = _inputs(CASES[name])
        attention(*qkv, impl="xla", **kw)
    (text_mask, text_causal), (cache_mask, cache_causal), (_, vision_causal) = calls
    assert text_causal and not cache_causal and not vision_causal
    seg = np.asarray(CASES["causal_padding_gqa"][6])
    np.testing.assert_array_equal(text_mask[:, 0], seg[:, :, None] == seg[:, None, :])
    assert not cache_mask[0, 0, 0, 15:].any()  # query at slot 14 sees no later slot


def test_dots_attention_remat_keeps_the_splash_forward():
    """Remat policy "dots_attention" saves the splash kernel's forward outputs (output and logsumexp, the
    backward's residuals): the backward no longer runs the forward kernel again. "dots" recomputes it, and
    every policy gives the same gradients."""
    from pixel_reasoner_jax.plan import flops as fl

    t, n, h = 256, 2, 128
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, t, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, n * h)) / 8, jnp.float32)

    def body(x, w):
        q = (x @ w).reshape(1, t, n, h)
        seg = jnp.zeros((1, t), jnp.int32)
        return (
            attention(q, q, q, q_segments=seg, kv_segments=seg, causal=True, impl="splash").reshape(1, t, -1)
            @ w.T
        )

    def grad(policy):
        loss = lambda x, w: jnp.sum(jnp.tanh(layers.remat(body, policy)(x, w)))
        return jax.make_jaxpr(jax.grad(loss, argnums=1))(x, w), jax.grad(loss, argnums=1)(x, w)

    (dots, g_dots), (kept, g_kept), (_, g_none) = grad("dots"), grad("dots_attention"), grad("none")
    forward = 2 * 2 * n * h * t * t / 2  # QK^T and PV over the causal half, counted per 128-tile
    assert fl.jaxpr_flops(dots) - fl.jaxpr_flops(kept) >= forward
    np.testing.assert_allclose(np.asarray(g_kept), np.asarray(g_none), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_dots), np.asarray(g_none), rtol=1e-5, atol=1e-5)
    # "offload_dots_attention": the same residuals, moved to host memory and back: the FLOPs of
    # "dots_attention", the same gradients, and transfers to the host that the on-device policy has none of.
    offloaded, g_off = grad("offload_dots_attention")
    assert fl.jaxpr_flops(offloaded) == fl.jaxpr_flops(kept)
    np.testing.assert_allclose(np.asarray(g_off), np.asarray(g_none), rtol=1e-5, atol=1e-5)
    assert _host_transfers(offloaded) >= 2 and _host_transfers(kept) == 0  # 2: the projection and splash


def _host_transfers(closed) -> int:
    """Outputs of `device_put`s to host memory in a jaxpr and the jaxprs nested in it."""
    from pixel_reasoner_jax.plan import flops as fl

    count = 0
    for eqn in getattr(closed, "jaxpr", closed).eqns:
        if eqn.primitive.name == "device_put":
            count += sum(str(d).endswith("Host") for d in eqn.params["devices"])
        count += sum(_host_transfers(sub) for sub in fl._sub_jaxprs(eqn.params))
    return count


def test_rows_falls_back_to_tiles_past_its_score_budget(monkeypatch):
    """Problems over MAX_SCORES run the tiled kernel (O(T) memory) and still equal the dense path."""
    monkeypatch.setattr(row_attention, "MAX_SCORES", 0)
    monkeypatch.setattr(row_attention, "row_block_attention", None)  # would raise if called
    tiled = []
    monkeypatch.setattr(
        layers, "blocked_attention", lambda *a, **k: tiled.append(1) or blocked_attention(*a, **k)
    )
    for name in ("causal_padding_gqa", "vision_blocks", "decode_t1"):
        _check_equals_dense("rows", CASES[name])
    assert len(tiled) == 3


# Splash tiles are 128 x 128 at least, so these cases are longer than CASES: each spans two query and two
# key tiles, ragged at the end (the module pads to whole tiles). Pallas interpret mode compiles slowly on a
# CPU (seconds per kernel), hence two cases that together hold every mask kind.
SPLASH_CASES = {
    # Decoder: causal, right padding in one row and left padding in the other, 2 query heads per kv head.
    "causal_padding_gqa": (2, 200, 200, 4, 2, True, np.r_[_seg((1, 170), (0, 30)), _seg((0, 45), (1, 155))], None, None, None),
    # Vision, run under a 2 x 2 mesh (batch over fsdp, heads over tensor through shard_map): row 0 holds
    # full-attention blocks of three images and padding, row 1 one window and its empty slots.
    "vision_blocks_sharded": (2, 150, 150, 2, 2, False, np.r_[_seg((1, 60), (2, 50), (3, 30), (0, 10)), _seg((1, 100), (0, 50))], None, None, None),
}  # fmt: skip


def test_splash_equals_dense_causal():
    _check_equals_dense("splash", SPLASH_CASES["causal_padding_gqa"])


def test_splash_fused_backward_equals_dense_with_fewer_flops():
    """The fused backward kernel gives the dense gradients and forms each tile's scores once: its backward
    counts 5 matmuls per tile where the separate dq and dk/dv kernels count 7."""
    from pixel_reasoner_jax.plan import flops as fl

    case = SPLASH_CASES["causal_padding_gqa"]
    _check_equals_dense("splash_fused", case)
    qkv, kw = _inputs(case)

    def count(impl):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl, **kw, **TILES[impl]))
        fwd = fl.jaxpr_flops(jax.make_jaxpr(loss)(*qkv))
        return fwd, fl.jaxpr_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*qkv)) - fwd

    (fwd, separate), (fwd_fused, fused) = count("splash"), count("splash_fused")
    # (The backward holds a few small matmuls outside the kernels: under 0.1 % of the count.)
    assert fwd == fwd_fused
    assert separate == pytest.approx(7 / 2 * fwd, rel=1e-2) and fused == pytest.approx(5 / 2 * fwd, rel=1e-2)


def test_splash_equals_dense_vision_blocks_sharded():
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    with sharding.use_mesh(mesh, "train"):
        _check_equals_dense("splash", SPLASH_CASES["vision_blocks_sharded"])


@pytest.mark.parametrize("name", ["decode_t1", "cache_prefill"])
def test_splash_with_cache_positions_takes_blocked(name):
    """Explicit positions (the KV cache) have no static splash mask: those calls run the blocked kernel."""
    _check_equals_dense("splash", CASES[name])


def test_fully_masked_tiles_are_skipped():
    """NaN keys and values confined to key tiles no query sees (the causal future of 16 queries; the other
    image's block) leave outputs and gradients finite: those tiles never run, forward or backward. The
    dense kernel multiplies the NaNs by zero probabilities and returns NaN."""
    cases = (
        (True, _seg((1, 16)), _seg((1, 32))),  # queries at slots 0..15, keys 16..31 in their future
        (False, _seg((1, 16)), _seg((1, 16), (2, 16))),  # queries of image 1, keys 16..31 of image 2
    )
    for causal, q_seg, kv_seg in cases:
        (q, k, v), kw = _inputs((1, 16, 32, 2, 2, causal, q_seg, kv_seg, None, None))
        k = k.at[:, 16:].set(jnp.nan)
        v = v.at[:, 16:].set(jnp.nan)

        def loss(q, k, v, kw=kw):
            return jnp.sum(attention(q, k, v, impl="blocked", block_q=8, block_k=8, **kw))

        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
        assert np.isfinite(float(value))
        assert all(np.isfinite(np.asarray(g[:, :16])).all() for g in grads)
        assert np.isnan(np.asarray(attention(q, k, v, impl="dense", **kw))).any()


def test_bfloat16_inputs_keep_dtype_and_stay_close():
    """bf16 q/k/v: the output is bf16 and within bf16 rounding of the dense kernel (8 mantissa bits over a
    probability-weighted average of unit values: 2e-2 absolute, not 1e-5)."""
    qkv, kw = _inputs(CASES["causal_padding_gqa"])
    qkv16 = [x.astype(jnp.bfloat16) for x in qkv]
    got = attention(*qkv16, impl="blocked", block_q=8, block_k=8, **kw)
    want = attention(*qkv16, impl="dense", **kw)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=0)


def test_resolve_attention():
    assert resolve_attention("auto", jnp.float32, "cpu") == "rows"
    assert resolve_attention("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert resolve_attention("auto", jnp.float32, "gpu") == "xla"
    assert resolve_attention("auto", jnp.bfloat16, "tpu") == "splash"
    assert resolve_attention("auto", jnp.float32, "tpu") == "splash"
    assert resolve_attention("auto", jnp.float32) in ATTENTION_IMPLS
    for impl in ("dense", "blocked", "splash", "xla"):
        assert resolve_attention(impl, jnp.float32, "gpu") == impl
    with pytest.raises(ValueError, match="attention must be one of"):
        resolve_attention("flash", jnp.float32)
    with pytest.raises(ValueError, match="cudnn attention needs a bfloat16"):
        resolve_attention("cudnn", jnp.float32, "gpu")
    qkv, kw = _inputs(CASES["vision_blocks"])
    with pytest.raises(ValueError, match="resolved"):
        attention(*qkv, impl="auto", **kw)
