"""M-RoPE position ids: worked examples (reference/qwen25vl.md §4.1), transformers equality, incremental API."""

import numpy as np
import pytest
import torch
from test_model_parity import CFG, IMG, VE, VID, VS, grids_of, make_conversation

from pixel_reasoner_jax.processing import rope

KW = dict(spatial_merge_size=2, tokens_per_second=2, image_token_id=IMG, video_token_id=VID)


def _hf_model():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    d = CFG.to_hf_dict()
    # Only get_rope_index is used: a one-layer, tiny-vocab shell is enough.
    d.update(vocab_size=151936, num_hidden_layers=1)
    return Qwen2_5_VLModel(Qwen2_5_VLConfig.from_dict(d))


@pytest.fixture(scope="module")
def hf_model():
    return _hf_model()


def test_worked_image_example():
    ids = [151644, 1, 2, 3, 198, VS] + [IMG] * 6 + [VE] + list(range(10, 18))
    assert len(ids) == 21
    pos, delta = rope.get_rope_index(ids, image_grid_thw=[[1, 4, 6]], **KW)
    t, h, w = pos[:, 0]
    np.testing.assert_array_equal(t[:12], [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6])
    np.testing.assert_array_equal(h[6:12], [6, 6, 6, 7, 7, 7])
    np.testing.assert_array_equal(w[6:12], [6, 7, 8, 6, 7, 8])
    np.testing.assert_array_equal(pos[:, 0, 12], [9, 9, 9])
    assert pos.max() == 17 and delta.tolist() == [-3]
    assert pos.dtype == np.int32


def test_worked_video_example():
    ids = [151644, 1, 2, 3, 198, VS] + [VID] * 12 + [VE, 5]
    pos, _ = rope.get_rope_index(ids, video_grid_thw=[[2, 4, 6]], second_per_grid_ts=[1.0], **KW)
    t, h, w = pos[:, 0]
    np.testing.assert_array_equal(t[6:18], [6] * 6 + [8] * 6)
    np.testing.assert_array_equal(h[6:18], [6, 6, 6, 7, 7, 7] * 2)
    np.testing.assert_array_equal(w[6:18], [6, 7, 8] * 4)
    np.testing.assert_array_equal(pos[:, 0, 18], [9, 9, 9])


def test_long_video_resumes_after_temporal_extent():
    """4.x semantics: text after a video resumes at the video's max position + 1 (34 here, 6 in 5.24)."""
    ids = [1, 2, VS] + [VID] * (16 * 6) + [VE, 7]
    pos, delta = rope.get_rope_index(ids, video_grid_thw=[[16, 4, 6]], second_per_grid_ts=[1.0], **KW)
    assert pos[0, 0, 3 + 95] == 3 + 30  # last temporal slice: 3 + 15 * 2
    np.testing.assert_array_equal(pos[:, 0, 3 + 96], [34, 34, 34])
    assert delta[0] == 35 + 1 - len(ids)


def _cases():
    rng = np.random.default_rng(0)
    return {
        "image": ([[("image", (1, 4, 6))]], None),
        "three_images": ([[("image", (1, 10, 14)), ("image", (1, 4, 8)), ("image", (1, 12, 6))]], None),
        "video": ([[("video", (2, 8, 12))]], [1.0]),
        "video_half_sec_and_image": ([[("video", (3, 6, 10)), ("image", (1, 4, 6))]], [0.5]),
        "batch_mixed": ([[("image", (1, 4, 6))], [("video", (2, 4, 6)), ("image", (1, 8, 8))], []], [1.0]),
    }, rng


@pytest.mark.parametrize("pad_left", [False, True])
@pytest.mark.parametrize("case", list(_cases()[0]))
def test_equals_transformers(hf_model, case, pad_left):
    cases, rng = _cases()
    rows, secs = cases[case]
    convs = [make_conversation(items, rng) for items in rows]
    t = max(len(c) for c in convs) + 2
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros_like(ids)
    for r, c in enumerate(convs):
        sl = slice(t - len(c), t) if pad_left else slice(0, len(c))
        ids[r, sl], mask[r, sl] = c, 1
    flat = [it for items in rows for it in items]
    img, vid = grids_of(flat, "image"), grids_of(flat, "video")
    pos, deltas = rope.get_rope_index(ids, mask, img, vid, secs, **KW)
    tt = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    want, want_d = hf_model.get_rope_index(
        torch.tensor(ids),
        torch.tensor(tt),
        image_grid_thw=None if img is None else torch.tensor(img),
        video_grid_thw=None if vid is None else torch.tensor(vid),
        second_per_grid_ts=None if secs is None else torch.tensor(secs),
        attention_mask=torch.tensor(mask),
    )
    m = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, m], want.numpy()[:, m])
    np.testing.assert_array_equal(pos[:, ~m], 1)  # 4.x padding value
    np.testing.assert_array_equal(deltas, want_d.numpy().reshape(-1))


def test_incremental_equals_full():
    """A multi-turn episode extended turn by turn equals one full call; prefixes are never recomputed."""
    rng = np.random.default_rng(3)
    turns = [
        (make_conversation([("image", (1, 10, 14))], rng), [(1, 10, 14)], None, None),
        (rng.integers(100, 1000, 7), None, None, None),  # sampled text
        (
            make_conversation([("image", (1, 4, 6)), ("image", (1, 8, 4))], rng),
            [(1, 4, 6), (1, 8, 4)],
            None,
            None,
        ),
        (make_conversation([("video", (3, 4, 6))], rng), None, [(3, 4, 6)], [0.5]),
        (rng.integers(100, 1000, 5), None, None, None),
    ]
    state = rope.init_rope_state()
    parts = []
    for ids, imgs, vids, secs in turns:
        p, state = rope.extend_positions(state, ids, imgs, vids, secs, **KW)
        assert p.shape == (3, len(ids))
        parts.append(p)
    all_ids = np.concatenate([t[0] for t in turns])
    full, delta = rope.get_rope_index(
        all_ids,
        image_grid_thw=[(1, 10, 14), (1, 4, 6), (1, 8, 4)],
        video_grid_thw=[(3, 4, 6)],
        second_per_grid_ts=[0.5],
        **KW,
    )
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full[:, 0])
    assert state.rope_delta == delta[0] and state.num_tokens == all_ids.size
    assert (state.num_images, state.num_videos) == (3, 1)
    # Decode positions continue the text positions: the next token would get next_pos.
    dec = rope.decode_positions([state.rope_delta], [state.num_tokens, state.num_tokens + 1])
    np.testing.assert_array_equal(dec[:, 0], [[state.next_pos, state.next_pos + 1]] * 3)


def test_errors_name_the_problem():
    state = rope.init_rope_state()
    with pytest.raises(ValueError, match="needs 6 consecutive pad tokens"):
        rope.extend_positions(state, [1, VS] + [IMG] * 4, [[1, 4, 6]], **KW)  # run cut by the turn end
    with pytest.raises(ValueError, match="more image pad runs than the 0 image grids"):
        rope.extend_positions(state, [1, IMG], None, **KW)
    with pytest.raises(ValueError, match="holds 1 images and 0 videos, but 2 image"):
        rope.get_rope_index([1, VS] + [IMG] * 6 + [VE], image_grid_thw=[[1, 4, 6], [1, 4, 6]], **KW)
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 entries for 1 videos"):
        rope.get_rope_index([VS] + [VID] * 12, video_grid_thw=[[2, 4, 6]], second_per_grid_ts=[1, 2], **KW)
    with pytest.raises(ValueError, match="input_ids must be"):
        rope.get_rope_index(np.zeros((1, 2, 3)), **KW)
