"""Trainer view of rollouts and SFT records: expansion, M-RoPE, pixels, collate alignment, buckets, cuts."""

import dataclasses

import numpy as np
import pytest
from memorize import ANSWER, Scripted, ScriptedPolicy, crop_text, noise_image, record, select_text

from pixel_reasoner_jax.data import synthetic
from pixel_reasoner_jax.data.records import load_image, load_sft_records
from pixel_reasoner_jax.data.sft_examples import sft_example
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing import batch as pb
from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.processing.rope import get_rope_index
from pixel_reasoner_jax.processing.vision import preprocess_image, preprocess_video
from pixel_reasoner_jax.rollout.episode import Episode, EpisodeConfig, PromptMedia, run_episodes
from pixel_reasoner_jax.rollout.policy import Video
from pixel_reasoner_jax.rollout.trajectory import expand_trajectory

PAD = 151643
IMAGE = noise_image(336, 224, seed=1)
FRAMES = tuple(noise_image(112, 112, seed=10 + k) for k in range(16))


@pytest.fixture(scope="module")
def mcfg(tiny_ckpt):
    return ModelConfig.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def rollouts(tok, proc):
    """An image episode (crop, crop of the crop, answer), a video one (select, answer), an aborted one."""
    scripts = {
        "img": [crop_text([0.1, 0.2, 0.5, 0.6]), crop_text([0.2, 0.2, 0.8, 0.8], target=2), ANSWER],
        "vid": [select_text([2, 6]), ANSWER],
        "abort": [Scripted("Let me", "abort")],
    }
    cfg = EpisodeConfig()
    episodes = [
        Episode.start(record("img"), tok, cfg, None, proc, media=PromptMedia(images=(IMAGE,))),
        Episode.start(
            record("vid", video=True), tok, cfg, None, proc, media=PromptMedia(video_frames=FRAMES)
        ),
        Episode.start(record("abort"), tok, cfg, None, proc, media=PromptMedia(images=(IMAGE,))),
    ]
    policy = ScriptedPolicy(tok, scripts)
    trajs = dict(zip(scripts, run_episodes(policy, episodes)))
    assert [t.status for t in trajs.values()] == ["answered", "answered", "aborted"]
    return trajs, policy


@pytest.fixture(scope="module")
def examples(rollouts, proc, mcfg):
    trajs, _ = rollouts
    return [expand_trajectory(trajs[k], proc, mcfg) for k in ("img", "vid")]


def _rope(ex, mcfg):
    return get_rope_index(
        ex.input_ids,
        image_grid_thw=ex.grid_thw[~ex.is_video],
        video_grid_thw=ex.grid_thw[ex.is_video],
        second_per_grid_ts=ex.second_per_grid_ts if ex.is_video.any() else None,
        spatial_merge_size=2,
        tokens_per_second=mcfg.vision.tokens_per_second,
        image_token_id=mcfg.image_token_id,
        video_token_id=mcfg.video_token_id,
    )[0][:, 0]


# ------------------------------------------------------------------------------------------ expand


@pytest.mark.parametrize("which", [0, 1])
def test_expand_trajectory(rollouts, examples, proc, mcfg, which):
    traj = list(rollouts[0].values())[which]
    ex = examples[which]
    ids, mask = chat.expand_pads(traj.input_ids, traj.loss_mask, traj.image_grids, traj.video_grids)
    np.testing.assert_array_equal(ex.input_ids, ids)
    np.testing.assert_array_equal(ex.loss_mask, mask)
    assert ex.input_ids.dtype == np.int32 and ex.length == traj.expanded_length
    np.testing.assert_array_equal(ex.positions, _rope(ex, mcfg))
    assert ex.positions.shape == (3, ex.length) and ex.positions.dtype == np.int32
    # Sampled ids and their log-probs survive expansion in order; pads carry neither.
    np.testing.assert_array_equal(ex.input_ids[ex.loss_mask == 1], traj.input_ids[traj.loss_mask == 1])
    np.testing.assert_array_equal(ex.logprobs[ex.loss_mask == 1], traj.logprobs[traj.loss_mask == 1])
    assert not ex.logprobs[ex.loss_mask == 0].any()
    # Each sampled token carries its turn's temperature (1.0, then 0.9 after a tool turn); others 1.0.
    want = np.concatenate([np.full(t.end - t.start, t.temperature, np.float32) for t in traj.turns])
    assert len({t.temperature for t in traj.turns}) == 2
    np.testing.assert_array_equal(ex.temperatures[ex.loss_mask == 1], want)
    assert (ex.temperatures[ex.loss_mask == 0] == 1.0).all()
    # Pixel rows: each item preprocessed as the processor would (the items are at final sizes already).
    rows = [
        preprocess_video(list(m.frames), proc, m.fps)[0]
        if isinstance(m, Video)
        else preprocess_image(m, proc)[0]
        for m in traj.media
    ]
    np.testing.assert_array_equal(ex.pixel_values, np.concatenate(rows))
    np.testing.assert_array_equal(ex.grid_thw, traj.grids)
    np.testing.assert_array_equal(ex.is_video, traj.is_video_item)
    assert ex.second_per_grid_ts.tolist() == list(traj.second_per_grid_ts)
    spans = ex.vision_spans
    assert (spans[:, 1] - spans[:, 0]).tolist() == [int(np.prod(g)) // 4 for g in traj.grids]
    assert all(ex.input_ids[s - 1] == 151652 and ex.input_ids[e] == 151653 for s, e in spans)


def test_expand_trajectory_errors(rollouts, proc, mcfg):
    trajs, _ = rollouts
    with pytest.raises(ValueError, match="'abort' has status 'aborted'"):
        expand_trajectory(trajs["abort"], proc, mcfg)
    wrong = dataclasses.replace(trajs["img"], grids=trajs["img"].grids + np.array([0, 2, 2]))
    with pytest.raises(ValueError, match="trajectory 'img'.*recorded"):
        expand_trajectory(wrong, proc, mcfg)
    bad = dataclasses.replace(trajs["img"], media=(IMAGE.resize((330, 224)),) + trajs["img"].media[1:])
    with pytest.raises(ValueError, match="330x224.*multiples of 28"):
        expand_trajectory(bad, proc, mcfg)
    other = dataclasses.replace(proc, merge_size=1)
    with pytest.raises(ValueError, match="differs from the model's vision config"):
        expand_trajectory(trajs["img"], other, mcfg)


# ------------------------------------------------------------------------------------------ collate


def test_collate_prediction_alignment(rollouts, examples, mcfg):
    b = pb.collate(examples, pad_id=PAD, vision_cfg=mcfg.vision)
    n = [ex.length for ex in examples]
    t = 1 << (max(n) - 1).bit_length()
    assert b.input_ids.shape == b.targets.shape == b.loss_mask.shape == (2, t)
    assert b.lengths.tolist() == n and b.num_tokens == sum(n) and b.attention_mask.sum(1).tolist() == n
    for i, ex in enumerate(examples):
        np.testing.assert_array_equal(b.input_ids[i, : n[i]], ex.input_ids)
        assert (b.input_ids[i, n[i] :] == PAD).all() and (b.positions[:, i, n[i] :] == 1).all()
        np.testing.assert_array_equal(b.positions[:, i, : n[i]], ex.positions)
        np.testing.assert_array_equal(b.targets[i, :-1], b.input_ids[i, 1:])
        # Column t describes target t + 1: the mask and both log-prob arrays shift with the targets.
        np.testing.assert_array_equal(b.loss_mask[i, : n[i] - 1], ex.loss_mask[1:])
        np.testing.assert_array_equal(b.sampler_logprobs[i, : n[i] - 1], ex.logprobs[1:])
        assert not b.loss_mask[i, n[i] - 1 :].any()
        sampled = b.loss_mask[i] == 1
        np.testing.assert_array_equal(b.targets[i][sampled], ex.input_ids[ex.loss_mask == 1])
    assert (b.targets[:, -1] == PAD).all()
    # The sampled ids of the episodes, in order, are exactly the trained targets, with their log-probs.
    trajs, policy = rollouts
    for i, key in enumerate(("img", "vid")):
        turns = [policy.results[f"{key}/turn{k}"] for k in range(len(trajs[key].turns))]
        sampled = b.loss_mask[i] == 1
        assert b.targets[i][sampled].tolist() == [x for r in turns for x in r.output_ids]
        np.testing.assert_allclose(b.sampler_logprobs[i][sampled], [x for r in turns for x in r.logprobs])
    assert b.num_loss_tokens == int(b.loss_mask.sum()) == sum(int(ex.loss_mask.sum()) for ex in examples)
    np.testing.assert_array_equal(b.old_logprobs, b.sampler_logprobs)
    assert b.old_logprobs is not b.sampler_logprobs
    # Pixels: each example's rows in its own batch row, zero-padded to the next power of two of the largest.
    largest = max(ex.num_patches for ex in examples)
    assert b.pixel_values.shape[:2] == (2, 1 << (largest - 1).bit_length())
    for i, ex in enumerate(examples):
        np.testing.assert_array_equal(b.pixel_values[i, : ex.num_patches], ex.pixel_values)
        assert not b.pixel_values[i, ex.num_patches :].any()
        assert int(b.vision_inputs.num_patches[i]) == ex.num_patches
    np.testing.assert_array_equal(b.grid_thw, np.concatenate([ex.grid_thw for ex in examples]))
    assert b.vision_inputs.perm.shape == b.pixel_values.shape[:2]
    assert not b.truncated.any() and not b.advantages.any()


def test_buckets(examples, mcfg):
    n = max(ex.length for ex in examples)
    b = pb.collate(examples, pad_id=PAD, vision_cfg=mcfg.vision, seq_buckets=(64, n + 8, 4 * n))
    assert b.input_ids.shape[1] == n + 8
    # Patch buckets are per sample: the largest sample's rows pick it.
    counts = [ex.num_patches for ex in examples]
    rows, big = max(counts), int(np.argmax(counts))
    b = pb.collate(examples, pad_id=PAD, vision_cfg=mcfg.vision, patch_buckets=(rows - 4, rows + 4, 8 * rows))
    assert b.pixel_values.shape[1] == rows + 4
    long = int(np.argmax([ex.length for ex in examples]))
    short = min(ex.length for ex in examples)
    qid, length = examples[long].qid, examples[long].length
    with pytest.raises(ValueError, match=rf"sample {long} \('{qid}'\) has {length} tokens.*truncate=True"):
        pb.collate(examples, pad_id=PAD, vision_cfg=mcfg.vision, seq_buckets=(short,))
    qid = examples[big].qid
    with pytest.raises(
        ValueError,
        match=rf"sample {big} \('{qid}'\) has {rows} patch rows, more than the largest patch bucket 64",
    ):
        pb.collate(examples, pad_id=PAD, vision_cfg=mcfg.vision, patch_buckets=(16, 64))
    with pytest.raises(ValueError, match="at least one example"):
        pb.collate([], pad_id=PAD, vision_cfg=mcfg.vision)
    assert [pb.pick_bucket(k, None) for k in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    assert pb.pick_bucket(10, (8, 16, 12)) == 12 and pb.pick_bucket(17, (8, 16)) is None


# ------------------------------------------------------------------------------------------ truncate


def test_truncate_example(examples, mcfg):
    ex = examples[0]  # prompt image, crop, crop of the crop
    spans = ex.vision_spans
    rows0 = int(np.prod(ex.grid_thw[0]))
    # A cut inside the second block's pads moves before its <|vision_start|>: one item left.
    mid = int(spans[1].mean())
    cut = pb.truncate_example(ex, mid)
    assert cut.length == spans[1, 0] - 1 and len(cut.grid_thw) == 1 and cut.num_patches == rows0
    np.testing.assert_array_equal(cut.pixel_values, ex.pixel_values[:rows0])
    np.testing.assert_array_equal(cut.positions, _rope(cut, mcfg))  # a prefix's positions are its own
    for field in ("input_ids", "loss_mask", "logprobs"):
        np.testing.assert_array_equal(getattr(cut, field), getattr(ex, field)[: cut.length])
    # A cut right after a <|vision_end|> keeps that item; one on the <|vision_end|> itself does not.
    assert len(pb.truncate_example(ex, int(spans[1, 1]) + 1).grid_thw) == 2
    assert len(pb.truncate_example(ex, int(spans[1, 1])).grid_thw) == 1
    assert pb.truncate_example(ex, 10 * ex.length).length == ex.length
    with pytest.raises(ValueError, match="max_len"):
        pb.truncate_example(ex, 0)
    # collate cuts rows longer than the largest bucket only when asked to.
    limit = mid
    b = pb.collate(examples, pad_id=PAD, vision_cfg=mcfg.vision, seq_buckets=(limit,), truncate=True)
    other = pb.truncate_example(examples[1], limit)
    assert b.truncated.tolist() == [True, examples[1].length > limit]
    assert b.lengths.tolist() == [cut.length, other.length] and b.input_ids.shape[1] == limit
    np.testing.assert_array_equal(b.grid_thw, np.concatenate([cut.grid_thw, other.grid_thw]))
    assert b.pixel_values[0, : cut.num_patches].any() and not b.pixel_values[0, cut.num_patches :].any()
    assert b.pixel_values[1, : other.num_patches].any()


# ------------------------------------------------------------------------------------------ SFT


@pytest.fixture(scope="module")
def sft_records(tmp_path_factory):
    cfg = synthetic.SynthConfig(image_size=224, video_size=112, textual_fraction=0.0, video_fraction=0.34)
    paths = synthetic.generate(
        tmp_path_factory.mktemp("synth"), num_sft=6, num_rl=0, num_eval=0, image_size=224, config=cfg
    )
    records, _ = load_sft_records(paths["sft"])
    return {r.extra["kind"]: r for r in records}


def _trained_runs(tok, ex) -> list[str]:
    edges = np.diff(np.concatenate([[0], ex.loss_mask, [0]]))
    return [
        tok.decode(ex.input_ids[a:b]) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))
    ]


def _text(msg) -> str:
    return "".join(c["text"] for c in msg["content"] if c["type"] == "text")


@pytest.mark.parametrize(
    ("mode", "trained"),
    [("final_turns", (4, 6)), ("per_turn", (2, 4, 6))],
)
def test_sft_example_masks(tok, proc, mcfg, sft_records, mode, trained):
    """zoom2 = [system, user, crop, obs, crop of the crop, obs, answer]. The original's mask trains the
    last two assistant turns only; per_turn trains every turn not marked `loss: false`."""
    rec = sft_records["zoom2"]
    assert [m["role"] for m in rec.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    ex = sft_example(rec, tok, proc, mcfg, mask_mode=mode)
    assert _trained_runs(tok, ex) == [_text(rec.messages[k]) + "<|im_end|>" for k in trained]
    assert ex.qid == rec.qid and not ex.logprobs.any() and len(ex.grid_thw) == 3
    np.testing.assert_array_equal(ex.positions, _rope(ex, mcfg))
    first = load_image(rec.messages[1]["content"][0]["image"])
    np.testing.assert_array_equal(
        ex.pixel_values[: int(np.prod(ex.grid_thw[0]))], preprocess_image(first, proc)[0]
    )
    # The erroneous crops of a self-correction trajectory are never trained in either mode.
    bad = sft_records["recrop2"]
    runs = _trained_runs(tok, sft_example(bad, tok, proc, mcfg, mask_mode=mode))
    assert runs == [_text(bad.messages[k]) + "<|im_end|>" for k in (6, 8)]


def test_sft_example_video(tok, proc, mcfg, sft_records):
    rec = sft_records["select"]
    ex = sft_example(rec, tok, proc, mcfg, video_min_pixels=4 * 784)
    n_sel = sum(c["type"] == "image" for c in rec.messages[3]["content"])
    assert ex.is_video.tolist() == [True] + [False] * n_sel
    assert ex.grid_thw[0].tolist() == [8, 8, 8] and ex.second_per_grid_ts.tolist() == [1.0]
    assert ex.num_patches == int(ex.grid_thw.prod(axis=1).sum())
    np.testing.assert_array_equal(ex.positions, _rope(ex, mcfg))
    assert _trained_runs(tok, ex)[-1] == _text(rec.messages[-1]) + "<|im_end|>"


def test_sft_errors_name_the_sample(tok, proc, mcfg, sft_records):
    rec = sft_records["single"]
    missing = dataclasses.replace(rec, messages=[dict(m) for m in rec.messages])
    missing.messages[1] = {"role": "user", "content": [{"type": "image", "image": "/nonexistent/x.png"}]}
    with pytest.raises(ValueError, match=rf"sample '{rec.qid}'.*x\.png"):
        sft_example(missing, tok, proc, mcfg)
    literal = dataclasses.replace(rec, messages=[dict(m) for m in rec.messages])
    literal.messages[2] = {"role": "assistant", "content": [{"type": "text", "text": "<|image_pad|>"}]}
    with pytest.raises(ValueError, match=rf"sample '{rec.qid}'.*vision token"):
        sft_example(literal, tok, proc, mcfg)
    with pytest.raises(ValueError, match=rf"sample '{rec.qid}'.*mask mode"):
        sft_example(rec, tok, proc, mcfg, mask_mode="all")
    # Items given in another order than the conversation holds them.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}]}]
    with pytest.raises(ValueError, match=r"sample 'x'.*media kinds"):
        pb.encode_messages(tok, messages, [Video(frames=FRAMES[:2]), FRAMES[0]], proc, mcfg, qid="x")
