"""KV-cache decoding: prefill + 16 cached steps equal the full forward and transformers' greedy generate."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from test_model_parity import CFG, batch_inputs, forward, ref  # noqa: F401 (ref is a fixture)

from pixel_reasoner_jax.models.qwen25vl import Qwen25VL, init_cache
from pixel_reasoner_jax.models.text import write_slots
from pixel_reasoner_jax.processing import rope
from pixel_reasoner_jax.processing.batch import pack_vision

STEPS = 16


def _steppers(graphdef):
    @jax.jit
    def prefill(params, ids, pos, mask, pix, vi, cache):
        model = nnx.merge(graphdef, params)
        hidden, cache = model.hidden_states(ids, pos, mask, pix, vi, cache=cache, cache_index=0)
        return model.logits(hidden), cache

    @jax.jit
    def step(params, tok, pos, cache, index):
        model = nnx.merge(graphdef, params)
        mask = jnp.ones(tok.shape, jnp.int32)
        hidden, cache = model.hidden_states(tok, pos, mask, cache=cache, cache_index=index)
        return model.logits(hidden)[:, -1], cache

    return prefill, step


def test_prefill_then_decode_matches_full_forward_and_hf_generate(ref):  # noqa: F811
    hf, (graphdef, params), _ = ref
    items = [("image", (1, 10, 14))]
    ours, hf_kw, valid, deltas = batch_inputs([items], np.random.default_rng(7), t_bucket=None)
    n = ours["ids"].shape[1]
    with torch.no_grad():
        gen = hf.generate(
            **hf_kw, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    new = gen.sequences[0, n:].numpy()
    assert new.size == STEPS
    hf_step_logits = np.stack([x[0].numpy() for x in gen.logits])
    prefill, step = _steppers(graphdef)
    cache = init_cache(CFG, 1, n + STEPS, jnp.float32)
    logits, cache = prefill(params, ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"], cache)
    got = [np.asarray(logits[0, -1])]
    for j in range(STEPS - 1):
        pos = rope.decode_positions(deltas, [n + j])
        lg, cache = step(params, jnp.asarray(new[None, j : j + 1], jnp.int32), jnp.asarray(pos), cache, n + j)
        got.append(np.asarray(lg[0]))
    got = np.stack(got)
    np.testing.assert_allclose(got, hf_step_logits, atol=1e-4, rtol=0)
    # Unrolled layers (the CPU default of runs) write and read the cache like the scan.
    with nnx.use_eager_sharding(False):
        unrolled = nnx.graphdef(nnx.eval_shape(lambda: Qwen25VL(CFG, layer_loop="unroll", rngs=nnx.Rngs(0))))
    prefill_u, step_u = _steppers(unrolled)
    cache = init_cache(CFG, 1, n + STEPS, jnp.float32)
    logits, cache = prefill_u(params, ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"], cache)
    got_u = [np.asarray(logits[0, -1])]
    for j in range(3):
        pos = rope.decode_positions(deltas, [n + j])
        lg, cache = step_u(
            params, jnp.asarray(new[None, j : j + 1], jnp.int32), jnp.asarray(pos), cache, n + j
        )
        got_u.append(np.asarray(lg[0]))
    np.testing.assert_allclose(np.stack(got_u), got[:4], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), new)  # greedy tokens agree
    # ... and the full (uncached) forward over prompt + generated tokens gives the same rows.
    full_ids = np.concatenate([np.asarray(ours["ids"])[0], new])[None]
    pos, _ = rope.get_rope_index(
        full_ids,
        image_grid_thw=[(1, 10, 14)],
        spatial_merge_size=2,
        tokens_per_second=2,
        image_token_id=CFG.image_token_id,
        video_token_id=CFG.video_token_id,
    )
    full = forward(
        (graphdef, params),
        jnp.asarray(full_ids, jnp.int32),
        jnp.asarray(pos),
        jnp.ones(full_ids.shape, jnp.int32),
        ours["pix"],
        ours["vi"],
    )
    np.testing.assert_allclose(got, full[0, n - 1 : n + STEPS - 1], atol=1e-4, rtol=0)


def test_left_padded_batch_decode(ref):  # noqa: F811
    """Two prompts of different lengths, left-padded, decoding in step at a shared cache index."""
    _, (graphdef, params), _ = ref
    rng = np.random.default_rng(8)
    rows = [[("image", (1, 4, 6))], [("video", (2, 4, 6)), ("image", (1, 8, 8))]]
    ours, _, valid, deltas = batch_inputs(
        rows, rng, t_bucket=None, p_bucket=None, w_bucket=None, secs=[1.0], pad_left=True
    )
    b, tp = ours["ids"].shape
    n_pad = tp - valid.sum(1)
    assert n_pad.max() > 0
    cont = rng.integers(100, 1000, (b, STEPS))
    prefill, step = _steppers(graphdef)
    cache = init_cache(CFG, b, tp + STEPS, jnp.float32)
    logits, cache = prefill(params, ours["ids"], ours["pos"], ours["mask"], ours["pix"], ours["vi"], cache)
    got = [np.asarray(logits[:, -1])]
    for j in range(STEPS - 1):
        # Row r's token at slot s is its (s - n_pad[r])-th real token: position = that + rope_delta.
        pos = rope.decode_positions(deltas - n_pad, [tp + j])
        lg, cache = step(params, jnp.asarray(cont[:, j : j + 1], jnp.int32), jnp.asarray(pos), cache, tp + j)
        got.append(np.asarray(lg))
    got = np.stack(got, axis=1)  # (B, STEPS, V)
    # Reference: each row alone, unpadded, full forward over prompt + continuation.
    for r, items in enumerate(rows):
        prompt = np.asarray(ours["ids"])[r][valid[r]]
        full_ids = np.concatenate([prompt, cont[r]])[None]
        img = [g for k, g in items if k == "image"]
        vid = [g for k, g in items if k == "video"]
        pos, _ = rope.get_rope_index(
            full_ids,
            image_grid_thw=img or None,
            video_grid_thw=vid or None,
            second_per_grid_ts=[1.0] if vid else None,
            spatial_merge_size=2,
            tokens_per_second=2,
            image_token_id=CFG.image_token_id,
            video_token_id=CFG.video_token_id,
        )
        grids = np.array([g for _, g in items])
        n_rows = int(grids.prod(-1).sum())
        # The row alone at its exact patch count (the batch pads every row to the largest one's bucket).
        pix_r, vi_r = pack_vision(
            [np.asarray(ours["pix"])[r, :n_rows]], [grids], CFG.vision, patch_buckets=(n_rows,)
        )
        full = forward(
            (graphdef, params),
            jnp.asarray(full_ids, jnp.int32),
            jnp.asarray(pos),
            jnp.ones(full_ids.shape, jnp.int32),
            jnp.asarray(pix_r),
            vi_r,
        )
        k = prompt.size
        np.testing.assert_allclose(got[r], full[0, k - 1 : k + STEPS - 1], atol=1e-4, rtol=0)


def test_write_slots_per_row_clamps_like_dynamic_update_slice():
    # Per-row slots (with and without a layer index) equal a row-by-row dynamic_update_slice, whose
    # start counts from the end when negative and clamps so the whole update fits (slots 9 and -2 of 10,
    # 3 new tokens).
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 10, 2, 5))
    new = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 2, 5))
    index = jnp.array([0, 7, 9, -2])
    rows = [jax.lax.dynamic_update_slice(x[1, b], new[b], (index[b], 0, 0)) for b in range(4)]
    want = x.at[1].set(jnp.stack(rows))
    np.testing.assert_array_equal(jax.jit(write_slots)(x, new, index, jnp.int32(1)), want)
    np.testing.assert_array_equal(write_slots(x[1], new, index), want[1])
