"""Chat template in code vs the jinja template rendered by transformers; loss mask; episode pieces; errors."""

import numpy as np
import pytest

from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.processing import tokenizer as tk
from pixel_reasoner_jax.tools.prompts import TOOL_SCHEMAS, system_prompt, user_text

TOOLS = [TOOL_SCHEMAS["crop_image"], TOOL_SCHEMAS["select_frames"]]
CALL = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2, 0.5, 0.6], "target_image": 1}}\n</tool_call>'
OBSERVATION = "\nHere is the cropped image (Image Size: 112x84):"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tk.write_tokenizer_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(folder):
    return tk.QwenTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _hf_ids(hf_tok, messages, **kw):
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def _episode_messages():
    """A Pixel Reasoner image episode: question, crop call, crop observation, answer."""
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": user_text("How many birds?")}],
        },
        {"role": "assistant", "content": "The birds are small, let me zoom in.\n" + CALL},
        {"role": "user", "content": [{"type": "text", "text": OBSERVATION}, {"type": "image"}]},
        {"role": "assistant", "content": "I count three birds. The answer is \\boxed{3}."},
    ]


CASES = {
    "text": ([{"role": "user", "content": "Hello, who are you?"}], {}, (), ()),
    "text_with_system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        {},
        (),
        (),
    ),
    "images": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png"},
                    {"type": "text", "text": "Compare these:"},
                    {"type": "image_url", "image_url": {"url": "data:"}},
                ],
            }
        ],
        {},
        [(1, 4, 6), (1, 8, 8)],
        (),
    ),
    "video": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": ["f1.png"]},
                    {"type": "text", "text": "What happens?"},
                ],
            }
        ],
        {},
        (),
        [(8, 4, 6)],
    ),
    "tool_episode": (_episode_messages(), {}, [(1, 4, 6), (1, 6, 8)], ()),
    "vision_ids": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "video"},
                    {"type": "image"},
                    {"type": "text", "text": "?"},
                ],
            }
        ],
        {"add_vision_id": True},
        [(1, 2, 2), (1, 2, 4)],
        [(2, 2, 2)],
    ),
    "openai_tool_calls": (
        [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": "Zoom on the sign."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": "crop_image",
                            "arguments": {"bbox_2d": [1, 2, 3, 4], "target_image": 1},
                        },
                    },
                    {
                        "type": "function",
                        "function": {"name": "select_frames", "arguments": '{"target_frames": [1, 2]}'},
                    },
                ],
            },
            {"role": "tool", "content": "ok: 数字"},
            {"role": "tool", "content": "second result"},
            {
                "role": "assistant",
                "content": "Done.",
                "tool_calls": [{"name": "crop_image", "arguments": {"x": "é"}}],
            },
        ],
        {},
        (),
        (),
    ),
    "content_starts_with_newlines": (
        [
            {"role": "user", "content": "\n\n  spaced question  \n"},
            {"role": "assistant", "content": "\n   answer with leading whitespace"},
        ],
        {},
        (),
        (),
    ),
}


@pytest.mark.parametrize("with_tools", [False, True], ids=["no_tools", "tools"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_equal_the_rendered_template(tok, hf_tok, case, with_tools):
    messages, kw, image_grids, video_grids = CASES[case]
    tools = TOOLS if with_tools else None
    want = _hf_ids(hf_tok, messages, tools=tools, add_generation_prompt=True, **kw)
    got = chat.encode_conversation(
        tok,
        messages,
        image_grids=image_grids,
        video_grids=video_grids,
        add_generation_prompt=True,
        tools=tools,
        expand=False,
        **kw,
    )
    assert got.input_ids.dtype == np.int32 and got.loss_mask.dtype == np.int8
    assert got.input_ids.tolist() == want
    # Tool names resolve to the same schemas as the dicts.
    if with_tools:
        by_name = chat.encode_conversation(
            tok,
            messages,
            image_grids=image_grids,
            video_grids=video_grids,
            add_generation_prompt=True,
            tools=["crop_image", "select_frames"],
            expand=False,
            **kw,
        )
        np.testing.assert_array_equal(by_name.input_ids, got.input_ids)


def test_rendered_text_matches_the_references(hf_tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    # reference/qwen25vl.md §6.2 example (the Hub Qwen2.5-VL template's output).
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n<|im_start|>assistant\n"
    )
    # reference/pixel_reasoner.md §2.1: the system text with the tool block.
    text = hf_tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\n" + system_prompt() + "<|im_end|>\n<|im_start|>user\n")
    assert system_prompt().startswith("You are a helpful assistant.\n\n# Tools\n\nYou may call one or more")
    assert system_prompt().endswith(
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
    assert (
        chat.tool_block(["crop_image", "select_frames"])
        == system_prompt()[len("You are a helpful assistant.") :]
    )


def test_expanded_pads_and_slots(tok):
    messages, _, grids, _ = CASES["tool_episode"]
    collapsed = chat.encode_conversation(
        tok, messages, image_grids=grids, add_generation_prompt=False, expand=False
    )
    expanded = chat.encode_conversation(tok, messages, image_grids=grids, add_generation_prompt=False)
    assert expanded.expanded and not collapsed.expanded
    assert (expanded.input_ids == tok.image_pad).sum() == 6 + 12
    assert (collapsed.input_ids == tok.image_pad).sum() == 2
    ids, mask = chat.expand_pads(collapsed.input_ids, collapsed.loss_mask, grids)
    np.testing.assert_array_equal(ids, expanded.input_ids)
    np.testing.assert_array_equal(mask, expanded.loss_mask)
    assert [(s.kind, s.index, s.message, s.length) for s in expanded.slots] == [
        ("image", 0, 0, 6),
        ("image", 1, 2, 12),
    ]
    for s in expanded.slots:
        assert (expanded.input_ids[s.start : s.start + s.length] == tok.image_pad).all()
        assert expanded.input_ids[s.start - 1] == tok.vision_start
        assert expanded.input_ids[s.start + s.length] == tok.vision_end
    np.testing.assert_array_equal(expanded.image_grids, grids)
    # A video pad expands by t*h*w/4.
    vids, _ = chat.expand_pads(np.array([1, tok.video_pad, 2]), np.zeros(3, np.int8), video_grids=[(2, 4, 6)])
    assert vids.tolist() == [1] + [tok.video_pad] * 12 + [2]


def test_loss_mask_two_assistant_turns(tok):
    messages, _, grids, _ = CASES["tool_episode"]
    enc = chat.encode_conversation(tok, messages, image_grids=grids, add_generation_prompt=False, tools=TOOLS)
    ids, mask = enc.input_ids, enc.loss_mask
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(mask)) + 1)
    trained = [r for r in runs if mask[r[0]] == 1]
    assert len(trained) == 2
    assert tok.decode(ids[trained[0]]) == messages[1]["content"] + "<|im_end|>"
    assert tok.decode(ids[trained[1]]) == messages[3]["content"] + "<|im_end|>"
    # Everything else (system, user, observation, role headers, the "\n" after <|im_end|>) is context.
    assert mask.sum() == len(trained[0]) + len(trained[1])
    assert ids[trained[0][-1] + 1] == tok.encode("\n")[0]
    only_second = chat.encode_conversation(
        tok,
        messages,
        image_grids=grids,
        add_generation_prompt=False,
        tools=TOOLS,
        assistant_loss=[False, True],
    )
    np.testing.assert_array_equal(only_second.input_ids, ids)
    np.testing.assert_array_equal(np.flatnonzero(only_second.loss_mask), trained[1])


def test_mask_when_content_starts_with_newline(tok):
    enc = chat.encode_conversation(tok, CASES["content_starts_with_newlines"][0], add_generation_prompt=False)
    trained = enc.input_ids[enc.loss_mask == 1]
    # "assistant\n" + "\n   answer": the two newlines share one token, which is trained (it holds content).
    assert tok.decode(trained) == "\n\n   answer with leading whitespace<|im_end|>"


@pytest.mark.parametrize("closed", [True, False])
@pytest.mark.parametrize("expand", [True, False])
def test_episode_pieces_equal_the_full_rendering(tok, closed, expand):
    messages, _, grids, _ = CASES["tool_episode"]
    prompt = chat.encode_conversation(
        tok, messages[:1], image_grids=grids[:1], add_generation_prompt=True, tools=TOOLS, expand=expand
    )
    np.testing.assert_array_equal(prompt.input_ids[-3:], chat.generation_prompt_ids(tok))
    assert chat.generation_prompt_ids(tok).tolist() == [151644, 77091, 198]
    # The policy's turn: the model's own ids; without <|im_end|> when it stopped on </tool_call>.
    generated = tok.encode(messages[1]["content"]) + ([tok.im_end] if closed else [])
    obs = chat.observation_ids(
        tok, [OBSERVATION, {"type": "image"}], image_grids=grids[1:], expand=expand, closed=closed
    )
    assert obs.dtype == np.int32
    episode = np.concatenate([prompt.input_ids, generated, obs])
    full = chat.encode_conversation(
        tok, messages[:3], image_grids=grids, add_generation_prompt=True, tools=TOOLS, expand=expand
    )
    np.testing.assert_array_equal(episode, full.input_ids)
    head = [] if closed else [tok.im_end]
    assert obs[: len(head) + 3].tolist() == head + [198, tok.im_start, *tok.encode("user")]


def test_observation_with_video_and_error_text(tok):
    obs = chat.observation_ids(tok, ["\nExecution error:\nbad box\n"], closed=True)
    assert (
        tok.decode(obs)
        == "\n<|im_start|>user\n\nExecution error:\nbad box\n<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="observation holds image item number 1 but only 0 image grids"):
        chat.observation_ids(tok, ["x", {"type": "image"}])
    with pytest.raises(ValueError, match="1 image grids were given but the conversation has 0 image items"):
        chat.observation_ids(tok, ["x"], image_grids=[(1, 2, 2)])


def test_count_and_input_errors(tok):
    messages, _, grids, _ = CASES["tool_episode"]
    with pytest.raises(ValueError, match="message 2 holds image item number 2 but only 1 image grids"):
        chat.encode_conversation(tok, messages, image_grids=grids[:1], add_generation_prompt=True)
    with pytest.raises(ValueError, match="3 image grids were given but the conversation has 2 image items"):
        chat.encode_conversation(tok, messages, image_grids=[*grids, (1, 2, 2)], add_generation_prompt=True)
    with pytest.raises(ValueError, match="assistant_loss has 1 entries but the conversation has 2"):
        chat.encode_conversation(
            tok, messages, image_grids=grids, add_generation_prompt=True, assistant_loss=[True]
        )
    with pytest.raises(ValueError, match="message 0: role must be one of"):
        chat.encode_conversation(tok, [{"role": "robot", "content": "hi"}], add_generation_prompt=True)
    with pytest.raises(ValueError, match=r"message 0 item 0: text contains the vision token <\|image_pad\|>"):
        chat.encode_conversation(
            tok,
            [{"role": "user", "content": [{"type": "text", "text": "<|image_pad|>"}]}],
            add_generation_prompt=True,
        )
    with pytest.raises(ValueError, match=r"message 0 item 0: content item \{'type': 'audio'\} is not"):
        chat.encode_conversation(
            tok, [{"role": "user", "content": [{"type": "audio"}]}], add_generation_prompt=True
        )
    with pytest.raises(ValueError, match="message 0 item 1: content items must be dicts, got str"):
        chat.encode_conversation(
            tok,
            [{"role": "user", "content": [{"type": "image"}, "an image"]}],
            image_grids=[(1, 2, 2)],
            add_generation_prompt=True,
        )
    with pytest.raises(ValueError, match="at least one message"):
        chat.encode_conversation(tok, [], add_generation_prompt=True)
    with pytest.raises(ValueError, match="ids hold 1 image pads but 2 image grids"):
        chat.expand_pads(np.array([tok.image_pad]), np.zeros(1, np.int8), [(1, 2, 2), (1, 2, 2)])
    with pytest.raises(ValueError, match="run of pads ending at position 2"):
        chat.expand_pads(np.array([5, tok.image_pad, tok.image_pad]), np.zeros(3, np.int8), [(1, 2, 2)] * 2)
