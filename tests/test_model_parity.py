"""Parity of the Flax Qwen2.5-VL with transformers 5.24 (PyTorch CPU, float32) on the tiny config.

Logits for text, one image, three images with partial windows, videos, mixed image + video and a
right-padded batch; gradients of a masked token loss for every parameter. Also holds the shared helpers
(reference HF model, conversations, jitted forward) that the other model test files import.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from compile_options import FAST_COMPILE
from flax import nnx

from pixel_reasoner_jax.models import blocked_attention, hf_io
from pixel_reasoner_jax.models.config import PRESETS
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
from pixel_reasoner_jax.processing import rope
from pixel_reasoner_jax.processing.batch import pack_vision

CFG = PRESETS["tiny"]
VS, VE = CFG.vision_start_token_id, CFG.vision_end_token_id
IMG, VID = CFG.image_token_id, CFG.video_token_id
IM_START, IM_END = 151644, 151645
T_BUCKET, P_BUCKET, W_BUCKET = 128, 256, 16  # one compiled shape for every conversation below


# --------------------------------------------------------------------------------------- helpers


def build_hf_reference(out_dir, seed: int = 0):
    """A random float32 HF model with perturbed norms and biases, saved to `out_dir`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = CFG.to_hf_dict()
    d["torch_dtype"] = "float32"
    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(d)).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            # Default norms are ones and biases zeros: perturb so a wrong mapping cannot hide.
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(out_dir)
    return hf


@functools.cache
def _compiled_forward(graphdef):
    @jax.jit
    def fwd(params, ids, pos, mask, pix, vi):
        model = nnx.merge(graphdef, params)
        return model(ids, pos, mask, pix, vi)

    return fwd


def forward(model_parts, ids, pos, mask, pix=None, vi=None):
    graphdef, params = model_parts
    return np.asarray(_compiled_forward(graphdef)(params, ids, pos, mask, pix, vi))


def make_conversation(items, rng, text_len: int = 3) -> np.ndarray:
    """<|im_start|> a b c, then per item: vision_start, pads, vision_end, random text; <|im_end|>."""
    ids = [IM_START, *rng.integers(100, 1000, text_len).tolist()]
    for kind, grid in items:
        n = int(np.prod(grid)) // 4
        ids += [VS] + [IMG if kind == "image" else VID] * n + [VE]
        ids += rng.integers(100, 1000, text_len).tolist()
    return np.array([*ids, IM_END], np.int64)


def grids_of(items, kind):
    g = [grid for k, grid in items if k == kind]
    return np.array(g, np.int64).reshape(-1, 3) if g else None


def batch_inputs(
    rows, rng, *, t_bucket=T_BUCKET, p_bucket=P_BUCKET, w_bucket=W_BUCKET, secs=None, pad_left=False
):
    """Padded arrays for our model and the matching HF kwargs for a batch of conversations.

    rows: list of item lists [(kind, grid), ...]; returns (ours: dict, hf_kwargs: dict, valid mask).
    """
    convs = [make_conversation(items, rng) for items in rows]
    b = len(rows)
    t = max(len(c) for c in convs) if t_bucket is None else t_bucket
    ids = np.zeros((b, t), np.int64)
    mask = np.zeros((b, t), np.int64)
    for r, c in enumerate(convs):
        sl = slice(t - len(c), t) if pad_left else slice(0, len(c))
        ids[r, sl], mask[r, sl] = c, 1
    flat_items = [it for items in rows for it in items]
    img, vid = grids_of(flat_items, "image"), grids_of(flat_items, "video")
    pos, deltas = rope.get_rope_index(
        ids,
        mask,
        img,
        vid,
        secs,
        spatial_merge_size=2,
        tokens_per_second=CFG.vision.tokens_per_second,
        image_token_id=IMG,
        video_token_id=VID,
    )
    ours = dict(ids=jnp.asarray(ids, jnp.int32), pos=jnp.asarray(pos), mask=jnp.asarray(mask, jnp.int32))
    tt = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    hf_kw = dict(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), mm_token_type_ids=torch.tensor(tt)
    )
    if flat_items:
        grids = np.array([g for _, g in flat_items])
        rows_pix = [
            rng.standard_normal((int(np.prod(g)), CFG.vision.patch_dim)).astype(np.float32) for g in grids
        ]
        # Our layout is per sample (row r holds its own items' patch rows); HF concatenates the batch.
        per_row, start = [], 0
        for items in rows:
            per_row.append(rows_pix[start : start + len(items)])
            start += len(items)
        pix, vi = pack_vision(
            [np.concatenate(p) if p else np.zeros((0, CFG.vision.patch_dim), np.float32) for p in per_row],
            [np.array([g for _, g in items], np.int64).reshape(-1, 3) for items in rows],
            CFG.vision,
            patch_buckets=None if p_bucket is None else (p_bucket,),
            min_windows=w_bucket or 1,
        )
        ours.update(pix=jnp.asarray(pix), vi=vi)
        kinds = [k for k, _ in flat_items]
        if img is not None:
            hf_kw["pixel_values"] = torch.tensor(
                np.concatenate([p for k, p in zip(kinds, rows_pix) if k == "image"])
            )
            hf_kw["image_grid_thw"] = torch.tensor(img)
        if vid is not None:
            hf_kw["pixel_values_videos"] = torch.tensor(
                np.concatenate([p for k, p in zip(kinds, rows_pix) if k == "video"])
            )
            hf_kw["video_grid_thw"] = torch.tensor(vid)
            if secs is not None:
                hf_kw["second_per_grid_ts"] = torch.tensor(secs, dtype=torch.float32)
    return ours, hf_kw, mask.astype(bool), deltas


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(hf_model, (graphdef, params), ckpt_dir): the HF reference and our model loaded from its folder."""
    ckpt = tmp_path_factory.mktemp("hf_tiny")
    hf = build_hf_reference(ckpt)
    with nnx.use_eager_sharding(False):
        model = hf_io.load_model(ckpt)
    graphdef, params = nnx.split(model)
    return hf, (graphdef, params), ckpt


def hf_logits(hf, **kw):
    with torch.no_grad():
        return hf(**kw).logits.numpy()


# ----------------------------------------------------------------------------------------- tests

CASES = {
    "one_image": ([("image", (1, 4, 6))], None),
    # llm grids 5x7, 2x4, 6x3: full 4x4 windows next to partial ones on both edges.
    "three_images": ([("image", (1, 10, 14)), ("image", (1, 4, 8)), ("image", (1, 12, 6))], None),
    "video_4_frames": ([("video", (2, 8, 12))], [1.0]),
    "video_half_second": ([("video", (3, 6, 10))], [0.5]),
    "image_then_video": ([("image", (1, 10, 14)), ("video", (2, 4, 6))], [1.0]),
}


def test_text_only(ref):
    hf, parts, _ = ref
    ids = np.array([[IM_START, 10, 20, 30, 198, 40, 50, 60, 70, IM_END]])
    mask = np.ones_like(ids)
    pos, _ = rope.get_rope_index(
        ids, mask, spatial_merge_size=2, tokens_per_second=2, image_token_id=IMG, video_token_id=VID
    )
    ours = forward(parts, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    want = hf_logits(hf, input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_vision_conversation(ref, case):
    hf, parts, _ = ref
    items, secs = CASES[case]
    ours, hf_kw, valid, _ = batch_inputs([items], np.random.default_rng(1), secs=secs)
    got = forward(parts, ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"])
    n = int(valid.sum())
    hf_kw = {
        k: (v[:, :n] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
        for k, v in hf_kw.items()
    }
    want = hf_logits(hf, **hf_kw)
    np.testing.assert_allclose(got[0, :n], want[0], atol=1e-4, rtol=0)


def test_long_video_positions_passed_to_hf(ref):
    """A video whose temporal extent exceeds its spatial one: the 4.x positions (ours) differ from what
    transformers 5.24 derives, so HF gets our positions explicitly; the model maths must still agree."""
    hf, parts, _ = ref
    items = [("video", (8, 4, 6))]
    ours, hf_kw, valid, _ = batch_inputs([items], np.random.default_rng(2), secs=[1.0])
    n = int(valid.sum())
    got = forward(parts, ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"])
    kw = {
        k: (v[:, :n] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
        for k, v in hf_kw.items()
    }
    hf_pos, _ = hf.model.get_rope_index(
        kw["input_ids"],
        kw["mm_token_type_ids"],
        video_grid_thw=kw["video_grid_thw"],
        second_per_grid_ts=kw["second_per_grid_ts"],
    )
    assert not np.array_equal(hf_pos.numpy(), np.asarray(ours["pos"])[:, :, :n])  # the case is a real one
    kw["position_ids"] = torch.tensor(np.asarray(ours["pos"])[:, :, :n], dtype=torch.long)
    np.testing.assert_allclose(got[0, :n], hf_logits(hf, **kw)[0], atol=1e-4, rtol=0)


def test_right_padded_batch(ref):
    hf, parts, _ = ref
    rows = [[("image", (1, 10, 14))], [("video", (2, 4, 6)), ("image", (1, 4, 6))]]
    ours, hf_kw, valid, _ = batch_inputs(rows, np.random.default_rng(3), secs=[1.0])
    got = forward(parts, ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"])
    n = int(valid.sum(1).max())
    kw = {
        k: (v[:, :n] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
        for k, v in hf_kw.items()
    }
    want = hf_logits(hf, **kw)
    for r in range(2):
        m = valid[r, :n]
        np.testing.assert_allclose(got[r, :n][m], want[r][m], atol=1e-4, rtol=0)


def test_gradients_every_parameter(ref):
    """d(masked mean token NLL)/d(param) vs torch autograd, mapped through the hf_io table."""
    hf, (graphdef, params), _ = ref
    items = [("image", (1, 10, 14)), ("video", (2, 4, 6))]
    ours, hf_kw, valid, _ = batch_inputs([items], np.random.default_rng(4), secs=[1.0])
    ids = np.asarray(ours["ids"])
    loss_mask = np.zeros_like(ids, np.float32)
    loss_mask[0, 5 : int(valid.sum()) - 1] = 1.0  # includes vision pads and text; excludes padding
    targets = np.roll(ids, -1, axis=1).astype(np.int64)

    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        logits = model(ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"])
        lp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1)[..., 0]
        return jnp.sum(nll * loss_mask) / loss_mask.sum()

    grads = jax.jit(jax.grad(loss_fn))(params)
    flat = hf_io._flat(grads)
    n = int(valid.sum())
    kw = {
        k: (v[:, :n] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
        for k, v in hf_kw.items()
    }
    hf.zero_grad()
    logits = hf(**kw).logits
    nll = torch.nn.functional.cross_entropy(logits[0], torch.tensor(targets[0, :n]), reduction="none")
    m = torch.tensor(loss_mask[0, :n])
    (torch.sum(nll * m) / m.sum()).backward()
    checked = 0
    for name, p in hf.named_parameters():
        path, layer, want = hf_io.from_hf_tensor(name, p.grad.numpy(), CFG)
        got = np.asarray(flat[path] if layer is None else flat[path][layer])
        scale = max(float(np.abs(want).max()), 1e-12)
        err = float(np.abs(got - want).max()) / scale
        assert err <= 1e-4, f"{name}: relative grad error {err:.2e}"
        checked += 1
    assert checked == len(hf_io.hf_names(CFG))


def test_bfloat16_compute_close_to_float32(ref):
    """bf16 activations with fp32 params: same argmax-level behaviour; tolerance is bf16's ~3 digits
    accumulated over 2 text + 2 vision layers, hence 5e-2 relative to the logit scale (not 1e-4)."""
    _, (graphdef, params), ckpt = ref
    with nnx.use_eager_sharding(False):
        model16 = hf_io.load_model(ckpt, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ours, _, valid, _ = batch_inputs([CASES["one_image"][0]], np.random.default_rng(5))
    g16, p16 = nnx.split(model16)
    got16 = forward((g16, p16), ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"])
    got32 = forward((graphdef, params), ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"])
    n = int(valid.sum())
    scale = np.abs(got32[0, :n]).max()
    assert np.abs(got16[0, :n] - got32[0, :n]).max() <= 5e-2 * scale
    assert got16.dtype == np.float32


def test_remat_policies_and_attention_kernels_agree(ref, monkeypatch):
    """Rematerialisation changes memory, not values; the `xla` and `blocked` attention kernels equal the
    dense one (blocked also in its hand-written gradients)."""
    _, (graphdef, params), ckpt = ref
    ours, _, _, _ = batch_inputs(
        [CASES["one_image"][0]], np.random.default_rng(6), t_bucket=None, p_bucket=None, w_bucket=None
    )

    def grads(parts):
        """(logits, flat gradients of a function of the last logits), from one compiled program."""
        g, p = parts

        def loss(p):
            logits = nnx.merge(g, p)(ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"])
            return jnp.sum(jnp.tanh(logits[:, -4:])), logits

        grad, logits = jax.jit(jax.grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(p)
        return np.asarray(logits), hf_io._flat(grad)

    def assert_close_grads(other, base, what):
        for path, g in base.items():
            # Recomputation reorders float32 sums: compare relative to each gradient's scale.
            scale = max(np.abs(np.asarray(g)).max(), 1e-12)
            err = np.abs(np.asarray(other[path]) - np.asarray(g)).max() / scale
            assert err <= 1e-5, f"{what}: {path} relative error {err:.1e}"

    want, base = grads((graphdef, params))
    # The decoder's policy with the tower's own (vision_remat): dots in the decoder, full in the tower.
    for remat, vision in (("full", "same"), ("dots", "same"), ("dots", "full")):
        with nnx.use_eager_sharding(False):
            other = grads(nnx.split(hf_io.load_model(ckpt, remat=remat, vision_remat=vision)))[1]
        assert_close_grads(other, base, f"remat={remat}, vision_remat={vision}")
    # Unrolled layers (the CPU default of runs): the same logits and gradients as the scan, with and
    # without recomputation (the vision tower's layer kinds become static instead of a cond).
    for remat in ("none", "full"):
        with nnx.use_eager_sharding(False):
            got, other = grads(nnx.split(hf_io.load_model(ckpt, remat=remat, layer_loop="unroll")))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert_close_grads(other, base, f"unroll, remat={remat}")
    # Weight gradients formed from transposed inputs (the CPU default of runs), with and without remat.
    for remat in ("none", "full", "dots"):
        with nnx.use_eager_sharding(False):
            got, other = grads(nnx.split(hf_io.load_model(ckpt, remat=remat, weight_grad="transposed")))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert_close_grads(other, base, f"weight_grad=transposed, remat={remat}")
    with nnx.use_eager_sharding(False):
        xla = nnx.split(hf_io.load_model(ckpt, attention="xla"))
    got = forward(xla, ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # 8 x 8 tiles: every attention of the model (windows, per-image blocks, causal text) spans several
    # tiles, some of them skipped.
    monkeypatch.setattr(blocked_attention, "BLOCK_Q", 8)
    monkeypatch.setattr(blocked_attention, "BLOCK_K", 8)
    with nnx.use_eager_sharding(False):
        got, other = grads(nnx.split(hf_io.load_model(ckpt, attention="blocked")))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert_close_grads(other, base, "blocked")


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError, match="remat must be one of"):
        Qwen25VL(CFG, remat="some", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vision_remat must be 'same' or one of"):
        Qwen25VL(CFG, vision_remat="some", rngs=nnx.Rngs(0))
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Qwen25VL(CFG, remat="dots", vision_remat="full", rngs=nnx.Rngs(0)))
    assert (model.model.remat, model.visual.remat) == ("dots", "full")
    with pytest.raises(ValueError, match="attention must be one of"):
        Qwen25VL(CFG, attention="flash", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cudnn attention needs a bfloat16 or float16 compute dtype"):
        Qwen25VL(CFG, attention="cudnn", dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layer_loop must be one of"):
        Qwen25VL(CFG, layer_loop="while", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="weight_grad must be one of"):
        Qwen25VL(CFG, weight_grad="fast", rngs=nnx.Rngs(0))
