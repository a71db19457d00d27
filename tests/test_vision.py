"""Vision tower: host index arrays vs transformers' helpers, tower output vs HF, buckets, kernels, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_model_parity import CFG, build_hf_reference
from transformers import vision_utils

from pixel_reasoner_jax.models import hf_io, layers, vision
from pixel_reasoner_jax.models.qwen25vl import splice_vision
from pixel_reasoner_jax.models.vision import (
    pad_slots,
    pad_windows,
    prepare_vision,
    slice_sizes,
    slot_bucket,
    stack_vision,
    vision_rotary,
)
from pixel_reasoner_jax.processing.batch import pack_vision

VC = CFG.vision
GRID_SETS = {
    "one_image": [(1, 4, 6)],
    "partial_windows": [(1, 10, 14), (1, 4, 8), (1, 12, 6)],
    "exact_windows": [(1, 16, 8)],  # llm 8x4: divisible, HF pads a whole empty window row (dropped)
    "video_and_image": [(3, 6, 10), (1, 10, 14)],
}


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("hf_vision")
    hf = build_hf_reference(ckpt, seed=1)
    with nnx.use_eager_sharding(False):
        dense = hf_io.load_model(ckpt)
        xla = hf_io.load_model(ckpt, attention="xla")

    def batched(model):
        """The tower on (B, Pb, C) rows and stacked inputs."""
        graphdef, params = nnx.split(model.visual)
        fn = jax.jit(lambda p, x, vi: nnx.merge(graphdef, p)(x, vi))
        return lambda x, vi: np.asarray(fn(params, x, vi))

    def jitted(model):
        """The tower on one sample's (Pb, C) rows and `prepare_vision` output (a batch of one)."""
        run = batched(model)
        return lambda x, vi: run(x[None], stack_vision([vi]))[0]

    return hf, jitted(dense), jitted(xla), batched(dense)


@pytest.mark.parametrize("name", list(GRID_SETS))
def test_index_arrays_match_transformers(name):
    grid = torch.tensor(GRID_SETS[name])
    vi = prepare_vision(grid.numpy(), VC)
    window_index, cu_window = vision_utils.get_vision_window_index(
        grid, spatial_merge_size=2, window_size=VC.window_size, patch_size=VC.patch_size
    )
    # Patch-level permutation keeps the 4 patches of each merge unit together, in HF's window order.
    perm = vi.perm.reshape(-1, 4)
    np.testing.assert_array_equal(perm, perm[:, :1] + np.arange(4))
    np.testing.assert_array_equal(perm[:, 0] // 4, window_index.numpy())
    sizes = vi.window_segments.sum(1)
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(sizes[sizes > 0])]), cu_window.numpy())
    # Window slots gather consecutive window-order rows and scatter back to the same rows.
    flat_gather = vi.window_gather.reshape(-1)
    np.testing.assert_array_equal(flat_gather[vi.window_scatter], np.arange(vi.perm.size))
    pos = vision_utils.get_vision_position_ids(grid, 2).numpy()
    np.testing.assert_array_equal(vi.pos_hw, pos[vi.perm])
    cu = vision_utils.get_vision_cu_seqlens(grid).numpy()
    seg = vi.full_segments
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1, [seg.size]])
    np.testing.assert_array_equal(bounds, cu)
    np.testing.assert_array_equal(np.argsort(window_index.numpy()), vi.merge_unpermute)
    assert vi.window_gather.shape[1] == 64  # (112 / 14)^2 patches per window: O(P * 64) attention


def test_rotary_matches_transformers():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding

    hf_cfg = build_hf_config().vision_config
    emb = Qwen2_5_VLVisionRotaryEmbedding(hf_cfg)
    pos = torch.tensor(np.random.default_rng(0).integers(0, 200, (37, 2)))
    cos_ref, sin_ref = emb(torch.zeros(1), pos)
    cos, sin = vision_rotary(jnp.asarray(pos.numpy()), VC.head_dim, VC.rope_theta)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=1e-5, rtol=0)


def build_hf_config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_dict(CFG.to_hf_dict())


@pytest.mark.parametrize("name", list(GRID_SETS))
def test_tower_matches_transformers(tower, name):
    hf, run, _, _ = tower
    grid = np.array(GRID_SETS[name])
    p = int(grid.prod(-1).sum())
    pix = np.random.default_rng(0).standard_normal((p, VC.patch_dim)).astype(np.float32)
    with torch.no_grad():
        want = hf.model.visual(torch.tensor(pix), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    vi = prepare_vision(grid, VC, patch_bucket=512, window_bucket=16)
    padded = np.zeros((512, VC.patch_dim), np.float32)
    padded[:p] = pix
    got = run(jnp.asarray(padded), vi)
    assert got.shape == (128, CFG.text.hidden_size)
    np.testing.assert_allclose(got[: p // 4], want, atol=1e-5, rtol=0)


def test_bucket_padding_does_not_change_rows(tower):
    _, run, _, _ = tower
    grid = np.array(GRID_SETS["partial_windows"])
    p = int(grid.prod(-1).sum())
    pix = np.random.default_rng(1).standard_normal((p, VC.patch_dim)).astype(np.float32)
    exact = run(jnp.asarray(pix), prepare_vision(grid, VC))
    padded = np.full((512, VC.patch_dim), 7.0, np.float32)  # garbage padding must not leak into real rows
    padded[:p] = pix
    bucketed = run(jnp.asarray(padded), prepare_vision(grid, VC, patch_bucket=512, window_bucket=32))
    np.testing.assert_allclose(bucketed[: p // 4], exact, atol=1e-6, rtol=0)


def test_slot_bucket_steps():
    assert [slot_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 100, 7744)] == [
        1,
        2,
        3,
        4,
        6,
        8,
        12,
        16,
        128,
        8192,
    ]


@pytest.mark.parametrize("name", list(GRID_SETS))
def test_slots_hold_each_image_whole(name):
    grid = np.array(GRID_SETS[name])
    vi = prepare_vision(grid, VC, patch_bucket=512)
    ns, ls = vi.slot_gather.shape
    sizes = slice_sizes(grid)
    assert ls == slot_bucket(max(sizes)) and ns >= -(-sum(sizes) // ls)
    real = np.flatnonzero(vi.full_segments > 0)
    # Every real window-order row sits in exactly one slot position, and reads its own row back.
    filled = vi.slot_segments.reshape(-1) > 0
    assert filled.sum() == real.size == int(vi.num_patches)
    np.testing.assert_array_equal(vi.slot_gather.reshape(-1)[vi.slot_scatter[real]], real)
    np.testing.assert_array_equal(vi.slot_segments.reshape(-1)[vi.slot_scatter[real]], vi.full_segments[real])
    # Each image / frame slice lies whole in one slot; padding rows are in none; empty positions are unique.
    for seg in range(1, len(sizes) + 1):
        assert len(set((vi.slot_scatter[vi.full_segments == seg] // ls).tolist())) == 1
    assert (vi.slot_scatter[vi.full_segments == 0] == ns * ls).all()
    empty = vi.slot_segments[vi.slot_segments <= 0]
    assert (empty < 0).all() and np.unique(empty).size == empty.size


def test_packed_slots_equal_one_slot_over_the_bucket(tower):
    """Full attention packed into image-sized slots (several images to a slot where they fit) gives the
    rows attention over the whole bucket under segment ids gives, on both kernels; garbage padding rows
    stay out of the real ones."""
    _, dense, xla, _ = tower
    grid = np.array([(1, 10, 14), (2, 4, 8), (1, 4, 6), (1, 6, 6)])
    p = int(grid.prod(-1).sum())
    rng = np.random.default_rng(5)
    pix = np.full((512, VC.patch_dim), 7.0, np.float32)
    pix[:p] = rng.standard_normal((p, VC.patch_dim))
    packed = prepare_vision(grid, VC, patch_bucket=512)
    assert packed.slot_gather.shape == (2, 192)  # 140 | 32 + 32 + 24 + 36: two slots, the second shared
    whole = prepare_vision(grid, VC, patch_bucket=512, slot_len=512, num_slots=1)
    for run in (dense, xla):
        want = run(jnp.asarray(pix), whole)[: p // 4]
        np.testing.assert_allclose(run(jnp.asarray(pix), packed)[: p // 4], want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(
            run(jnp.asarray(pix), pad_slots(packed, 3))[: p // 4], want, atol=1e-5, rtol=0
        )


def test_xla_attention_kernel_matches_dense(tower):
    _, dense, xla, _ = tower
    grid = np.array(GRID_SETS["video_and_image"])
    p = int(grid.prod(-1).sum())
    pix = np.random.default_rng(2).standard_normal((p, VC.patch_dim)).astype(np.float32)
    vi = prepare_vision(grid, VC)
    np.testing.assert_allclose(xla(jnp.asarray(pix), vi), dense(jnp.asarray(pix), vi), atol=1e-5, rtol=0)


def test_gpu_tiles_of_the_full_attention_slots_match_dense(tower, tmp_path, monkeypatch):
    # On GPU ("cudnn" / "xla") the full-attention slots run the blocked kernel in GPU_FULL_ATTENTION_TILE
    # tiles: at 8 rows a tile, every slot spans several tiles and the ones between a slot's segments are
    # skipped; the tower's output is the dense one's.
    _, dense, _, _ = tower
    monkeypatch.setattr(vision, "GPU_FULL_ATTENTION_TILE", 8)
    tiles, kernel = [], layers.blocked_attention

    def blocked(*args, **kw):
        tiles.append((kw.get("block_q"), kw.get("block_k")))
        return kernel(*args, **kw)

    monkeypatch.setattr(layers, "blocked_attention", blocked)
    build_hf_reference(tmp_path, seed=1)  # the fixture's weights
    with nnx.use_eager_sharding(False):
        xla = hf_io.load_model(tmp_path, attention="xla")
    graphdef, params = nnx.split(xla.visual)
    run = jax.jit(lambda p, x, vi: nnx.merge(graphdef, p)(x, vi))
    grid = np.array(GRID_SETS["video_and_image"])
    p = int(grid.prod(-1).sum())
    pix = np.random.default_rng(3).standard_normal((p, VC.patch_dim)).astype(np.float32)
    vi = prepare_vision(grid, VC)
    assert vi.slot_gather.shape[-1] > 8
    got = np.asarray(run(params, jnp.asarray(pix)[None], stack_vision([vi])))[0]
    np.testing.assert_allclose(got, dense(jnp.asarray(pix), vi), atol=1e-5, rtol=0)
    assert tiles and set(tiles) == {(8, 8)}  # the full layers' slots, and only they, ran blocked


def test_prepare_vision_errors():
    with pytest.raises(ValueError, match="multiples of 2"):
        prepare_vision([[1, 5, 6]], VC)
    with pytest.raises(ValueError, match="positive"):
        prepare_vision([[0, 4, 6]], VC)
    with pytest.raises(ValueError, match="patch_bucket 16 must be >= 24"):
        prepare_vision([[1, 4, 6]], VC, patch_bucket=16)
    with pytest.raises(ValueError, match="multiple of 4"):
        prepare_vision([[1, 4, 6]], VC, patch_bucket=26)
    with pytest.raises(ValueError, match="window_bucket 1 is smaller than the 4 windows"):
        prepare_vision([[1, 10, 14]], VC, window_bucket=1)
    with pytest.raises(
        ValueError, match=r"slot_len 100 is smaller than the largest image / frame slice \(140"
    ):
        prepare_vision([[1, 10, 14]], VC, slot_len=100)
    with pytest.raises(ValueError, match="num_slots 1 is smaller than the 2 slots needed"):
        prepare_vision([[1, 10, 14], [1, 10, 14]], VC, num_slots=1)
    with pytest.raises(ValueError, match="different slot lengths"):
        stack_vision(
            [
                prepare_vision([[1, 4, 6]], VC, patch_bucket=64),
                prepare_vision([[1, 4, 8]], VC, patch_bucket=64),
            ]
        )
    with pytest.raises(ValueError, match="num_slots 1 is smaller than the 2 slots present"):
        pad_slots(prepare_vision([[1, 4, 6], [1, 4, 6]], VC, slot_len=24), 1)


def test_window_bucket_default_is_power_of_two():
    vi = prepare_vision([[1, 10, 14], [1, 4, 6]], VC, patch_bucket=256)
    # 4 + 1 real windows + 2 padding windows (256 - 164 = 92 rows, 64 per window) = 7 -> 8
    assert vi.window_gather.shape == (8, 64)
    assert int(vi.num_patches) == 164 and int(vi.num_merged) == 41
    assert vi.valid.sum() == 164 and vi.perm.shape == (256,)


def test_per_sample_layout_equals_concatenated_batch(tower):
    """Each row's items in their own batch row (attention never across rows) give the rows the former
    layout gave, where every item of the batch went through one tower call and was spliced in flat
    (row-major) pad order; a row without vision items included."""
    _, _, _, run = tower
    rows = [[(1, 10, 14), (1, 4, 8)], [(3, 6, 10)], [], [(1, 12, 6), (1, 4, 6), (1, 4, 4)]]
    rng = np.random.default_rng(3)
    grids = [np.array(r, np.int64).reshape(-1, 3) for r in rows]
    pixels = [rng.standard_normal((int(g.prod(-1).sum()), VC.patch_dim)).astype(np.float32) for g in grids]
    pix, vi = pack_vision(pixels, grids, VC, patch_buckets=None)
    assert pix.shape == (4, 256, VC.patch_dim) and vi.perm.shape == (4, 256)
    np.testing.assert_array_equal(vi.num_merged, [g.prod(-1).sum() // 4 for g in grids])
    per_sample = run(jnp.asarray(pix), vi)

    flat_pix = np.concatenate(pixels)
    concat = prepare_vision(np.concatenate(grids), VC, patch_bucket=512)
    padded = np.zeros((512, VC.patch_dim), np.float32)
    padded[: len(flat_pix)] = flat_pix
    old = run(jnp.asarray(padded[None]), stack_vision([concat]))[0]
    start = 0
    for b, n in enumerate(np.asarray(vi.num_merged).tolist()):
        np.testing.assert_allclose(per_sample[b, :n], old[start : start + n], atol=1e-5, rtol=0)
        start += n

    # Splice: each row takes its own sample's rows, as the flat splice over the concatenation did.
    t = 160
    ids = np.zeros((4, t), np.int32)
    for b, n in enumerate(np.asarray(vi.num_merged).tolist()):
        ids[b, 3 : 3 + n] = CFG.image_token_id
    embeds = np.ones((4, t, per_sample.shape[-1]), np.float32)
    got = np.asarray(splice_vision(embeds, ids, per_sample, CFG.image_token_id, CFG.video_token_id))
    is_pad = (ids == CFG.image_token_id).reshape(-1)
    want = embeds.reshape(-1, embeds.shape[-1]).copy()
    want[is_pad] = old[: int(is_pad.sum())]
    np.testing.assert_allclose(got, want.reshape(got.shape), atol=1e-5, rtol=0)


def test_stack_vision_pads_windows_and_checks_buckets():
    small = prepare_vision([[1, 4, 6]], VC, patch_bucket=64)
    large = prepare_vision([[1, 10, 14]], VC, patch_bucket=256)
    with pytest.raises(ValueError, match="different patch buckets"):
        stack_vision([small, large])
    other = prepare_vision([[1, 4, 6], [1, 4, 4]], VC, patch_bucket=64)
    vi = stack_vision([small, other], num_windows=8)
    assert vi.window_gather.shape == (2, 8, 64) and vi.perm.shape == (2, 64)
    # Added windows are empty: no filled slot, and the scatter never points into them.
    np.testing.assert_array_equal(
        vi.window_segments[0, : small.window_gather.shape[0]], small.window_segments
    )
    assert vi.window_segments[0, small.window_gather.shape[0] :].sum() == 0
    assert vi.window_scatter[0].max() < small.window_gather.size
    with pytest.raises(ValueError, match="num_windows 1 is smaller"):
        pad_windows(small, 1)


@pytest.mark.parametrize("flags", [(True, False), (False, False)])
def test_scanned_tower_equals_unrolled_for_every_block_layout(flags):
    """The scanned tower (a `lax.cond` per block on the traced kind) equals the unrolled one (static
    kinds, checked against transformers in test_model_parity) in rows and parameter gradients, wherever
    the full-attention blocks sit: first, nowhere (last, the configs' layout: test_model_parity)."""
    grid = np.array(GRID_SETS["partial_windows"])
    vi = stack_vision([prepare_vision(grid, VC, patch_bucket=512, window_bucket=16)])
    pix = jnp.asarray(np.random.default_rng(2).standard_normal((1, 512, VC.patch_dim)), jnp.float32)
    out = {}
    for loop in ("scan", "unroll"):
        with nnx.use_eager_sharding(False):
            tower = vision.Qwen25VisionTower(VC, 48, layer_loop=loop, rngs=nnx.Rngs(3))
        tower.full_flags = flags
        graphdef, params = nnx.split(tower)

        def loss(p, graphdef=graphdef):
            rows = nnx.merge(graphdef, p)(pix, vi)
            return jnp.sum(jnp.tanh(rows[0, :64])), rows

        grads, rows = jax.jit(jax.grad(loss, has_aux=True))(params)
        out[loop] = np.asarray(rows), jax.tree.leaves(grads)
    np.testing.assert_allclose(out["scan"][0], out["unroll"][0], atol=1e-5, rtol=0)
    for a, b in zip(out["scan"][1], out["unroll"][1]):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=0)
