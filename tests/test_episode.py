"""Episode state machine driven by a scripted policy: observations, statuses, masks, log-probs, media.

Every trajectory also goes through `_check`, the invariants that hold for any episode.
"""

import dataclasses

import numpy as np
import pytest
from memorize import ANSWER, Scripted, ScriptedPolicy, call_text, crop_text, noise_image, record, select_text
from PIL import Image

from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.processing.vision import resize_to_limits
from pixel_reasoner_jax.rollout.episode import (
    STATUSES,
    Episode,
    EpisodeConfig,
    PrefixError,
    PromptMedia,
    run_episodes,
)
from pixel_reasoner_jax.rollout.policy import GenerationResult, Video
from pixel_reasoner_jax.tools.prompts import PROMPT_STYLES, system_prompt

IMAGE = noise_image(336, 224, seed=1)
FRAMES = tuple(noise_image(112, 112, seed=10 + k) for k in range(16))
CFG = EpisodeConfig(temperature=0.8, temperature_after_tool=0.3)
OBS_HEAD = "<|im_start|>user\n"
OBS_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


def _start(tok, proc, cfg=CFG, video=False, image=IMAGE, episode_id="e0", question=None):
    media = PromptMedia(video_frames=FRAMES) if video else PromptMedia(images=(image,))
    rec = record(episode_id, video=video) if question is None else record(episode_id, question, video)
    return Episode.start(rec, tok, cfg, None, proc, media=media, episode_id=episode_id)


def _run(tok, proc, script, cfg=CFG, video=False, image=IMAGE, **policy_kw):
    ep = _start(tok, proc, cfg, video, image)
    policy = ScriptedPolicy(tok, {"e0": script}, **policy_kw)
    [traj] = run_episodes(policy, [ep])
    if traj.status != "invalid_tokens":  # its stray pads break the one-block-per-item invariant on purpose
        _check(tok, traj, policy)
    return traj, policy


def _observation(tok, traj, k: int) -> str:
    """Text of the ids after turn k up to the next turn (or the end)."""
    end = traj.turns[k + 1].start if k + 1 < len(traj.turns) else len(traj.input_ids)
    return tok.decode(traj.input_ids[traj.turns[k].end : end])


def _grid(item) -> tuple[int, int, int]:
    frames = item.frames if isinstance(item, Video) else (item,)
    w, h = frames[0].size
    return (-(-len(frames) // 2) if isinstance(item, Video) else 1, h // 14, w // 14)


def _check(tok, traj, policy):
    """Invariants of any trajectory: sampled ids kept exactly with mask 1 and their log-probs, everything
    else mask 0 / log-prob 0, one block per vision item with the grid's pad count, prefix-growing requests."""
    ids, mask, lps = traj.input_ids, traj.loss_mask, traj.logprobs
    assert ids.dtype == np.int32 and mask.dtype == np.int8 and lps.dtype == np.float32
    expected_mask = np.zeros(len(ids), np.int8)
    expected_lp = np.zeros(len(ids), np.float32)
    for k, turn in enumerate(traj.turns):
        res = policy.results[f"{traj.episode_id}/turn{k}"]
        assert ids[turn.start : turn.end].tolist() == list(res.output_ids)
        expected_mask[turn.start : turn.end] = 1
        expected_lp[turn.start : turn.end] = res.logprobs
        assert turn.weight_version == res.weight_version
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(lps, expected_lp)
    assert not mask[: traj.prompt_length].any()
    # What the original's rule_reward read: the whole decoded conversation, pads dropped, split at every
    # assistant header and re-joined from the first one on (extract_qwen_query_and_response).
    full = tok.decode(ids.tolist()).replace("<|image_pad|>", "").replace("<|video_pad|>", "")
    assert traj.solution_text == "".join(full.split("<|im_start|>assistant\n")[1:])
    assert traj.scored_text("original") == traj.solution_text
    assert traj.scored_text("strict") == traj.response_text
    # One <|vision_start|> pad <|vision_end|> block per item, the pad kind matching the item.
    pads = np.flatnonzero(np.isin(ids, (tok.image_pad, tok.video_pad)))
    assert len(pads) == len(traj.media) == len(traj.grids)
    for p, item, grid in zip(pads, traj.media, traj.grids):
        assert ids[p - 1] == tok.vision_start and ids[p + 1] == tok.vision_end
        assert ids[p] == (tok.video_pad if isinstance(item, Video) else tok.image_pad)
        assert tuple(grid) == _grid(item)
    expanded, _ = chat.expand_pads(ids, mask, traj.image_grids, traj.video_grids)
    assert len(expanded) == traj.expanded_length
    runs = np.diff(
        np.flatnonzero(np.diff(np.concatenate([[0], np.isin(expanded, (tok.image_pad, tok.video_pad)), [0]])))
    )[::2]
    assert runs.tolist() == [int(np.prod(g)) // 4 for g in traj.grids]
    # Every request extends the previous one (ids and media), and the last one plus its output is the start
    # of the trajectory.
    mine = [r for r in policy.requests if r.rid.startswith(f"{traj.episode_id}/")]
    for a, b in zip(mine, mine[1:]):
        assert b.input_ids[: len(a.input_ids)] == a.input_ids
        assert all(x is y for x, y in zip(a.media, b.media)) and len(b.media) >= len(a.media)
    if mine:
        last = policy.results[mine[-1].rid]
        assert list(mine[-1].input_ids) + list(last.output_ids) == ids[: traj.turns[-1].end].tolist()
    assert traj.status in STATUSES


# ------------------------------------------------------------------------------------------ prompt


def test_prompt_is_the_documented_rendering(tok, proc):
    ep = _start(tok, proc)
    text = tok.decode(ep.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert '"name": "crop_image"' in text and '"name": "select_frames"' in text
    user = f"<|im_end|>\n<|im_start|>user\n{BLOCK}Which letter is in the corner?\n\n"
    assert user in text and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # 336x224 fits every limit, so the model sees it as is: 12 x 8 merged tokens.
    assert ep.expanded_length == len(ep.input_ids) - 1 + (336 // 28) * (224 // 28)

    notool = _start(tok, proc, dataclasses.replace(CFG, prompt_mode="notool"))
    text = tok.decode(notool.input_ids)
    assert "# Tools" not in text and "put your final answer within \\boxed{}" in text
    policy = ScriptedPolicy(tok, {"e0": [crop_text([0.1, 0.2, 0.5, 0.6])]})
    [traj] = run_episodes(policy, [notool])
    assert traj.num_calls == 0 and len(traj.media) == 1 and len(traj.turns) == 1  # calls never run

    terse = _start(tok, proc, dataclasses.replace(CFG, prompt_style="terse"))
    text = tok.decode(terse.input_ids)
    want = f"<|im_start|>system\n{system_prompt(PROMPT_STYLES['terse'])}<|im_end|>\n<|im_start|>user\n{BLOCK}"
    assert text.startswith(want + "Which letter is in the corner?<|im_end|>\n<|im_start|>assistant\n")
    assert len(terse.input_ids) < len(ep.input_ids) - 300  # the tool block and guideline are gone


def test_prompt_media_loaded_from_disk(tok, proc, tmp_path):
    path = tmp_path / "q.png"
    IMAGE.save(path)
    rec = dataclasses.replace(record("disk"), images=[str(path)])
    ep = Episode.start(rec, tok, CFG, None, proc)
    assert ep.episode_id == "disk" and ep.input_ids == _start(tok, proc).input_ids


# ------------------------------------------------------------------------------------------ crops


def test_crop_normalised_then_answer(tok, proc):
    traj, policy = _run(tok, proc, [crop_text([0.1, 0.2, 0.5, 0.6]), ANSWER])
    assert traj.status == "answered" and traj.has_answer and traj.trainable
    # Capped padding: x in [0.1-0.1, 0.5+0.1], y in [0.2-0.1, 0.6+0.1] of 336x224 -> box (0, 22, 201, 156),
    # 201x134 px, smart_resize -> 196x140.
    expected = IMAGE.crop((0, 22, 201, 156)).resize((196, 140), Image.BICUBIC)
    assert np.array_equal(np.asarray(traj.media[1]), np.asarray(expected))
    # The turn stopped on </tool_call>: the <|im_end|> the sampler did not write is appended with mask 0.
    obs = _observation(tok, traj, 0)
    assert obs == (
        f"<|im_end|>\n{OBS_HEAD}\nHere is the cropped image (Image Size: 196x140):{BLOCK}{OBS_TAIL}"
    )
    first = traj.turns[0]
    assert traj.input_ids[first.end] == tok.im_end and traj.loss_mask[first.end] == 0
    assert traj.input_ids[first.end - 1] == tok.tool_call_end and traj.loss_mask[first.end - 1] == 1
    assert (traj.num_calls, traj.num_valid_calls, traj.num_failed_calls) == (1, 1, 0)
    assert first.tool_call and first.tool_ok and first.tool_name == "crop_image" and first.tool_error is None
    # The lower temperature is used after a tool result.
    assert [r.sampling.temperature for r in policy.requests] == [0.8, 0.3]
    assert [t.temperature for t in traj.turns] == [0.8, 0.3]
    assert traj.response_text.endswith("The answer is \\boxed{B}.")


def test_closed_call_gets_no_extra_im_end(tok, proc):
    # Stopping only on EOS, as the original does, the policy writes the <|im_end|> itself (mask 1).
    cfg = dataclasses.replace(CFG, stop_token_ids=(tok.im_end, tok.endoftext))
    traj, _ = _run(tok, proc, [crop_text([0.1, 0.2, 0.5, 0.6], closed=True), ANSWER], cfg=cfg)
    first = traj.turns[0]
    assert traj.input_ids[first.end - 1] == tok.im_end and traj.loss_mask[first.end - 1] == 1
    assert _observation(tok, traj, 0).startswith(f"\n{OBS_HEAD}\nHere is the cropped image")
    assert traj.status == "answered"


def test_crop_absolute_reads_the_size_the_model_saw(tok, proc):
    """672x448 exceeds the tiny processor's 448*448 px: the model sees 532x364, and absolute coordinates
    refer to that size; the crop is cut from the kept 672x448 image."""
    big = noise_image(672, 448, seed=2)
    absolute, _ = _run(tok, proc, [crop_text([133, 91, 266, 182]), ANSWER], image=big)
    normalised, _ = _run(tok, proc, [crop_text([0.25, 0.25, 0.5, 0.5]), ANSWER], image=big)
    assert absolute.media[0].size == (532, 364)
    assert np.array_equal(np.asarray(absolute.media[1]), np.asarray(normalised.media[1]))
    # (0.15, 0.15, 0.6, 0.6) of 672x448 -> box (100, 67, 403, 268), 303x201 px -> 308x196.
    expected = big.crop((100, 67, 403, 268)).resize((308, 196), Image.BICUBIC)
    assert np.array_equal(np.asarray(absolute.media[1]), np.asarray(expected))


def test_crop_of_a_crop(tok, proc):
    traj, _ = _run(
        tok, proc, [crop_text([0.1, 0.2, 0.5, 0.6]), crop_text([0.2, 0.2, 0.8, 0.8], target=2), ANSWER]
    )
    assert traj.status == "answered" and traj.num_valid_calls == 2 and len(traj.media) == 3
    first = traj.media[1]  # 196x140; (0.1, 0.1, 0.9, 0.9) of it -> box (19, 14, 176, 126), 157x112 px
    expected = first.crop((19, 14, 176, 126)).resize((168, 112), Image.BICUBIC)
    assert np.array_equal(np.asarray(traj.media[2]), np.asarray(expected))
    assert "(Image Size: 168x112)" in _observation(tok, traj, 1)


def test_crop_announces_the_size_the_model_sees(tok, proc):
    """A crop larger than the processor allows is resized into its limits before the text is written."""
    big = noise_image(672, 448, seed=3)
    traj, _ = _run(tok, proc, [crop_text([0.05, 0.05, 0.95, 0.95]), ANSWER], image=big)
    w, h = traj.media[1].size
    assert w * h <= proc.max_pixels
    assert f"(Image Size: {w}x{h})" in _observation(tok, traj, 0)


# ------------------------------------------------------------------------------------------ video


@pytest.mark.parametrize("numbering, target", [("original", 3), ("observed", 2)])
def test_select_frames_on_a_video_then_crop_a_selected_frame(tok, proc, numbering, target):
    script = [select_text([1, 5, 9]), crop_text([0.1, 0.1, 0.6, 0.6], target=target), ANSWER]
    cfg = dataclasses.replace(CFG, ops=dataclasses.replace(CFG.ops, video_crop_index=numbering))
    traj, _ = _run(tok, proc, script, cfg=cfg, video=True)
    assert traj.status == "answered" and traj.num_valid_calls == 2
    assert "<|vision_start|><|video_pad|><|vision_end|>" in tok.decode(traj.input_ids[: traj.prompt_length])
    assert isinstance(traj.media[0], Video) and traj.is_video_item.tolist() == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert traj.grids[0].tolist() == [8, 8, 8] and traj.second_per_grid_ts == (1.0,)
    obs = _observation(tok, traj, 0)
    assert obs == (
        f"<|im_end|>\n{OBS_HEAD}\nHere are the selected frames (Frame Size: 112x112, Numbered 1 to 3):"
        f"{BLOCK * 3}{OBS_TAIL}"
    )
    for got, k in zip(traj.media[1:4], (0, 4, 8)):
        assert np.array_equal(np.asarray(got), np.asarray(FRAMES[k]))
    # The second returned image (frame 5): number 2 as the selection numbered it, 3 in the original's list
    # [[video], frame 1, frame 5, frame 9].
    expected = resize_to_limits(FRAMES[4].crop((0, 0, 78, 78)), 4 * 784, 1000 * 784)
    assert np.array_equal(np.asarray(traj.media[4]), np.asarray(expected))


# ------------------------------------------------------------------------------------------ errors

SMALL = noise_image(112, 112, seed=4)
ERRORS = {
    "box_too_small": (crop_text([0.5, 0.5, 0.51, 0.51]), False, SMALL, "Cropped image is too small: 24x24"),
    "target_out_of_range": (
        crop_text([0.1, 0.1, 0.5, 0.5], target=3),
        False,
        IMAGE,
        "Execution Error: Incorrect `target_image` argument in `crop_image` operation. You can only pick an "
        "image within [1,1]",
    ),
    "more_than_8_frames": (
        select_text(range(1, 10)),
        True,
        None,
        "Execution Error: You have selected 9 frames in total. Think again which frames you need to check in "
        "details (no more than 8 frames)",
    ),
    "frame_out_of_range": (
        select_text([3, 17]),
        True,
        None,
        "Execution Error: There are 16 frames numbered in range [1,16]. Your selection `target_frames=[3, 17]` "
        "is out of range.",
    ),
    "select_on_image": (
        select_text([1]),
        False,
        IMAGE,
        "Execution Error: You attempted to `select_frames` from **image** not **video**. You should use "
        "`crop_image` instead for inspecting **image**.",
    ),
    "unknown_tool": (
        call_text("rotate_image", '{"angle": 90}'),
        False,
        IMAGE,
        "Execution Error: Unknown tool 'rotate_image'. Available tools: `crop_image`, `select_frames`.",
    ),
    "invalid_json": (
        call_text("crop_image", '{"bbox_2d": [0.1, 0.2'),
        False,
        IMAGE,
        "Execution Error: The tool call is not valid JSON (Expecting ',' delimiter: line 1 column 58 (char 57)): "
        '\'{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2}\'',
    ),
    "missing_argument": (
        call_text("crop_image", '{"bbox_2d": [0.1, 0.2, 0.5, 0.6]}'),
        False,
        IMAGE,
        "Execution Error: `crop_image` is missing required argument(s) `target_image`; it takes `bbox_2d`, "
        "`target_image`.",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_failed_call_observation(tok, proc, case):
    call, video, image, message = ERRORS[case]
    traj, _ = _run(tok, proc, [call, ANSWER], video=video, image=image)
    assert _observation(tok, traj, 0) == f"<|im_end|>\n{OBS_HEAD}\nExecution error:\n{message}\n{OBS_TAIL}"
    assert len(traj.media) == 1  # no image appended
    first = traj.turns[0]
    assert first.tool_call and first.tool_ok is False and first.tool_error == message
    assert (traj.num_calls, traj.num_valid_calls, traj.num_failed_calls) == (1, 0, 1)
    # The original scores an answer right after a failed call as a tool error (reference §9.1).
    assert traj.status == "tool_error" and traj.ended_after_failed_call and traj.has_answer


def test_counts_and_weight_versions(tok, proc):
    script = [crop_text([0.1, 0.1, 0.5, 0.5], target=7), crop_text([0.1, 0.1, 0.5, 0.5]), ANSWER]
    traj, _ = _run(tok, proc, script, bump_versions=True)
    assert traj.status == "answered" and not traj.ended_after_failed_call
    assert (traj.num_calls, traj.num_valid_calls, traj.num_failed_calls) == (2, 1, 1)
    assert [t.tool_ok for t in traj.turns] == [False, True, None]
    assert traj.turn_versions == ("v0", "v1", "v2") and traj.policy_versions == {"v0", "v1", "v2"}


# ------------------------------------------------------------------------------------------ statuses


def test_no_answer_and_malformed_call(tok, proc):
    traj, _ = _run(tok, proc, ["I cannot tell from this picture.<|im_end|>"])
    assert traj.status == "no_answer" and not traj.has_answer and traj.num_calls == 0
    unclosed = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.1, 0.5, 0.5], "target_image": 1}}<|im_end|>'
    traj, _ = _run(tok, proc, [unclosed])
    assert traj.status == "malformed_call" and traj.num_calls == 0 and len(traj.media) == 1


def test_max_tool_calls(tok, proc):
    """A call requested after more than 3 executed calls ends the episode: at most 4 run."""
    traj, policy = _run(tok, proc, [crop_text([0.1, 0.1, 0.5, 0.5])] * 5 + [ANSWER])
    assert traj.status == "max_tool_calls"
    assert (traj.num_calls, traj.num_valid_calls) == (5, 4) and len(traj.media) == 5
    last = traj.turns[-1]
    assert last.tool_call and last.tool_ok is None and last.end == len(traj.input_ids)
    assert len(policy.requests) == 5


def test_max_images(tok, proc):
    cfg = dataclasses.replace(CFG, max_images=2)
    traj, _ = _run(tok, proc, [crop_text([0.1, 0.1, 0.5, 0.5])] * 2 + [ANSWER], cfg=cfg)
    assert traj.status == "max_images" and len(traj.media) == 2 and traj.num_valid_calls == 1
    assert traj.num_calls == 2 and traj.turns[-1].end == len(traj.input_ids)


def test_context_limit(tok, proc):
    prompt = _start(tok, proc).expanded_length
    # Already full: no request at all.
    ep = _start(tok, proc, dataclasses.replace(CFG, max_total_tokens=prompt))
    assert ep.done and ep.next_request() is None and ep.trajectory().status == "context_limit"
    # A turn cut by the remaining budget.
    traj, policy = _run(tok, proc, [ANSWER], cfg=dataclasses.replace(CFG, max_total_tokens=prompt + 4))
    assert policy.requests[0].sampling.max_new_tokens == 4
    assert traj.status == "context_limit" and traj.truncated and traj.expanded_length == prompt + 4
    # A call whose observation (text + a 96-token image) would not fit: not appended.
    call = crop_text([0.1, 0.2, 0.5, 0.6])
    n = len(tok.encode(call))
    traj, _ = _run(tok, proc, [call, ANSWER], cfg=dataclasses.replace(CFG, max_total_tokens=prompt + n + 50))
    assert traj.status == "context_limit" and traj.num_calls == 1 and traj.num_valid_calls == 0
    assert len(traj.input_ids) == traj.turns[-1].end and len(traj.media) == 1


def test_aborted_and_invalid_tokens(tok, proc):
    traj, _ = _run(tok, proc, [Scripted("Let me", "abort")])
    assert traj.status == "aborted" and not traj.trainable
    traj, _ = _run(tok, proc, ["Look: <|image_pad|><|im_end|>"])
    assert traj.status == "invalid_tokens" and not traj.trainable
    # Ids past the tokenizer (the model's vocabulary is padded to 151936) end the episode, not the batch.
    ep = _start(tok, proc)
    ep.next_request()
    ep.apply(GenerationResult((151900, tok.im_end), (-1.0, -2.0), "stop", tok.im_end, "v0"))
    assert ep.trajectory().status == "invalid_tokens"


# ------------------------------------------------------------------------------------------ protocol


def test_prefix_error_when_state_is_tampered(tok, proc):
    policy = ScriptedPolicy(tok, {"e0": [crop_text([0.1, 0.1, 0.5, 0.5])] * 3})
    ep = _start(tok, proc)
    with pytest.raises(RuntimeError, match="without a pending request"):
        ep.apply(GenerationResult((), (), "stop", None, "v0"))
    req = ep.next_request()
    assert ep.next_request() is req  # the same request until apply
    ep.apply(policy.generate([req])[0])
    ep._ids[3] += 1
    with pytest.raises(PrefixError, match=r"episode 'e0'.*position 3"):
        ep.next_request()
    ep._ids[3] -= 1
    ep.apply(policy.generate([ep.next_request()])[0])
    ep._media[0] = ep._media[0].copy()  # equal pixels, but not the item the sampler was sent
    with pytest.raises(PrefixError, match="media list changed"):
        ep.next_request()
    with pytest.raises(RuntimeError, match="not finished"):
        ep.trajectory()


def test_run_episodes_batches_and_keeps_order(tok, proc):
    scripts = {
        f"e{k}": [crop_text([0.1, 0.1, 0.5, 0.5])] * k + [f"It is \\boxed{{{k}}}.<|im_end|>"]
        for k in range(5)
    }
    episodes = [_start(tok, proc, episode_id=f"e{k}", question=f"Question {k}?") for k in range(5)]
    policy = ScriptedPolicy(tok, scripts)
    trajs = run_episodes(policy, episodes, max_concurrency=2)
    assert max(policy.batch_sizes) == 2 and sum(policy.batch_sizes) == sum(k + 1 for k in range(5))
    for k, traj in enumerate(trajs):
        _check(tok, traj, policy)
        assert traj.episode_id == f"e{k}" and f"Question {k}?" in tok.decode(traj.input_ids)
        assert traj.num_valid_calls == k and traj.response_text.endswith(f"It is \\boxed{{{k}}}.")
    calls = len(policy.batch_sizes)
    again = run_episodes(policy, episodes)  # finished episodes are returned without another request
    assert len(policy.batch_sizes) == calls and [t.status for t in again] == ["answered"] * 5
    with pytest.raises(ValueError, match="max_concurrency"):
        run_episodes(policy, episodes, max_concurrency=0)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="EpisodeConfig.top_p"):
        EpisodeConfig(top_p=0.0)
    with pytest.raises(ValueError, match="EpisodeConfig.prompt_mode"):
        EpisodeConfig(prompt_mode="tools")
    with pytest.raises(ValueError, match="EpisodeConfig.prompt_style"):
        EpisodeConfig(prompt_style="short")


def test_from_rollout_config_is_the_papers_default():
    from configs import grpo
    from pixel_reasoner_jax import config as C

    cd = grpo.get_config("7b")
    cd.workdir, cd.model.checkpoint, cd.data.rl_path = "/tmp/run", "/ckpt", "/data/rl.jsonl"
    assert EpisodeConfig.from_rollout(C.from_config_dict(cd).rollout) == EpisodeConfig()
    cd.rollout.template, cd.rollout.max_frames, cd.rollout.temperature_after_tool = "notool", 4, 0.5
    cd.rollout.prompt_style = "terse"
    cfg = EpisodeConfig.from_rollout(C.from_config_dict(cd).rollout)
    assert (cfg.prompt_mode, cfg.ops.max_frames, cfg.temperature_after_tool) == ("notool", 4, 0.5)
    assert cfg.prompt_style == "terse"
