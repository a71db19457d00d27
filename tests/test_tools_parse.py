"""Tests of tools/parse.py: call parsing, turn detection, and a scripted table of every observation text."""

import json

import numpy as np
import pytest
from PIL import Image

from pixel_reasoner_jax.tools import parse
from pixel_reasoner_jax.tools.ops import OpsConfig, ToolResult, VisualState, apply_result
from pixel_reasoner_jax.tools.parse import (
    ToolCall,
    ToolCallError,
    execute,
    is_tool_call_turn,
    parse_tool_call,
)


@pytest.fixture(autouse=True)
def _no_unexpected_errors():
    parse.clear_unexpected_errors()
    yield
    assert parse.unexpected_errors() == []


def _call(name, **arguments):
    return (
        "I should look closer.\n<tool_call>\n"
        + json.dumps({"name": name, "arguments": arguments})
        + "\n</tool_call>"
    )


def _err(message):
    return f"\nExecution error:\n{message}\n"


def _images():
    """An image query: a 448x336 original and a 100x100 original."""
    return VisualState.for_images(
        [Image.new("RGB", (448, 336), "white"), Image.new("RGB", (100, 100), "white")]
    )


def _video():
    return VisualState.for_video([Image.new("RGB", (64, 48), (10 * i, 0, 0)) for i in range(16)])


def _after(state, *responses):
    """State after running `responses` (each must succeed)."""
    for text in responses:
        result = execute(parse_tool_call(text), state)
        assert result.ok, result.text
        state = apply_result(state, result)
    return state


BAD_TARGET = "Execution Error: Incorrect `target_image` argument in `crop_image` operation."
CROP_CALL = _call("crop_image", bbox_2d=[0.25, 0.25, 0.5, 0.5], target_image=1)
SELECT_2 = _call("select_frames", target_frames=[2, 5])

# (case id, state factory, response text, expected observation, expected number of new images)
TABLE = [
    # crops: 448x336 -> padded box (67, 50)-(268, 201) = 201x151 -> smart_resize 196x140
    ("crop normalised", _images, CROP_CALL, "\nHere is the cropped image (Image Size: 196x140):", 1),
    (
        "crop absolute",
        _images,
        _call("crop_image", bbox_2d=[112, 84, 224, 168], target_image=1),
        "\nHere is the cropped image (Image Size: 196x140):",
        1,
    ),
    # crop of the 196x140 crop (image 3): (0, 0)-(117, 84) -> 112x84
    (
        "crop of a crop",
        lambda: _after(_images(), CROP_CALL),
        _call("crop_image", bbox_2d=[0.0, 0.0, 0.5, 0.5], target_image=3),
        "\nHere is the cropped image (Image Size: 112x84):",
        1,
    ),
    (
        "target 1.0 read as 1",
        _images,
        _call("crop_image", bbox_2d=[0.25, 0.25, 0.5, 0.5], target_image=1.0),
        "\nHere is the cropped image (Image Size: 196x140):",
        1,
    ),
    (
        "alias crop_image_normalized",
        _images,
        _call("crop_image_normalized", bbox_2d=[0.25, 0.25, 0.5, 0.5], target_image=1),
        "\nHere is the cropped image (Image Size: 196x140):",
        1,
    ),
    (
        "alias zoom_in",
        _images,
        _call("zoom_in", bbox_2d=[0.25, 0.25, 0.5, 0.5], target_image=1),
        "\nHere is the cropped image (Image Size: 196x140):",
        1,
    ),
    # 100x100 -> (30, 30)-(55, 55)
    (
        "box too small",
        _images,
        _call("crop_image", bbox_2d=[0.4, 0.4, 0.45, 0.45], target_image=2),
        _err("Cropped image is too small: 25x25"),
        0,
    ),
    (
        "inverted box",
        _images,
        _call("crop_image", bbox_2d=[0.5, 0.2, 0.1, 0.6], target_image=1),
        _err(
            "Execution Error: Invalid `bbox_2d=[0.5, 0.2, 0.1, 0.6]`: expected x1 < x2 and y1 < y2 for [x1, y1, x2, y2]."
        ),
        0,
    ),
    (
        "target out of range",
        _images,
        _call("crop_image", bbox_2d=[0.1, 0.1, 0.5, 0.5], target_image=3),
        _err(BAD_TARGET + " You can only pick an image within [1,2]"),
        0,
    ),
    (
        "target 0",
        _images,
        _call("crop_image", bbox_2d=[0.1, 0.1, 0.5, 0.5], target_image=0),
        _err(BAD_TARGET + " You can only pick an image within [1,2]"),
        0,
    ),
    (
        "target name in message follows the call",
        _images,
        _call("crop_image_normalized", bbox_2d=[0.1, 0.1, 0.5, 0.5], target_image=-1),
        _err(
            "Execution Error: Incorrect `target_image` argument in `crop_image_normalized` operation. You can only "
            "pick an image within [1,2]"
        ),
        0,
    ),
    (
        "target 1.5",
        _images,
        _call("crop_image", bbox_2d=[0.1, 0.1, 0.5, 0.5], target_image=1.5),
        _err(
            "Execution Error: `target_image` must be an integer image index (1 for the original image), got 1.5."
        ),
        0,
    ),
    (
        "target string",
        _images,
        _call("crop_image", bbox_2d=[0.1, 0.1, 0.5, 0.5], target_image="1"),
        _err(
            "Execution Error: `target_image` must be an integer image index (1 for the original image), got '1'."
        ),
        0,
    ),
    (
        "target bool",
        _images,
        _call("crop_image", bbox_2d=[0.1, 0.1, 0.5, 0.5], target_image=True),
        _err(
            "Execution Error: `target_image` must be an integer image index (1 for the original image), got True."
        ),
        0,
    ),
    (
        "wrong type bbox",
        _images,
        _call("crop_image", bbox_2d="0.1, 0.1, 0.5, 0.5", target_image=1),
        _err(
            "Execution Error: `bbox_2d` must be a list of 4 finite numbers [x1, y1, x2, y2], got '0.1, 0.1, 0.5, 0.5'."
        ),
        0,
    ),
    (
        "bbox of 3",
        _images,
        _call("crop_image", bbox_2d=[0.1, 0.1, 0.5], target_image=1),
        _err(
            "Execution Error: `bbox_2d` must be a list of 4 finite numbers [x1, y1, x2, y2], got [0.1, 0.1, 0.5]."
        ),
        0,
    ),
    (
        "bbox NaN",
        _images,
        '<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [NaN, 0, 10, 10], "target_image": 1}}</tool_call>',
        _err(
            "Execution Error: `bbox_2d` must be a list of 4 finite numbers [x1, y1, x2, y2], got [nan, 0, 10, 10]."
        ),
        0,
    ),
    # video: 64x48 frames -> 56x56
    (
        "select on a video",
        _video,
        SELECT_2,
        "\nHere are the selected frames (Frame Size: 56x56, Numbered 1 to 2):",
        2,
    ),
    (
        "second select continues the numbering",
        lambda: _after(_video(), SELECT_2),
        _call("select_frames", target_frames=[1, 16, 7]),
        "\nHere are the selected frames (Frame Size: 56x56, Numbered 3 to 5):",
        3,
    ),
    (
        "more than 8 frames",
        _video,
        _call("select_frames", target_frames=list(range(1, 10))),
        _err(
            "Execution Error: You have selected 9 frames in total. Think again which frames you need to check in "
            "details (no more than 8 frames)"
        ),
        0,
    ),
    (
        "frame out of range",
        _video,
        _call("select_frames", target_frames=[1, 17]),
        _err(
            "Execution Error: There are 16 frames numbered in range [1,16]. Your selection `target_frames=[1, 17]` "
            "is out of range."
        ),
        0,
    ),
    (
        "frame 0",
        _video,
        _call("select_frames", target_frames=[0, 3]),
        _err(
            "Execution Error: There are 16 frames numbered in range [1,16]. Your selection `target_frames=[0, 3]` "
            "is out of range."
        ),
        0,
    ),
    (
        "duplicate frames",
        _video,
        _call("select_frames", target_frames=[3, 3]),
        _err(
            "Execution Error: Your selection `target_frames=[3, 3]` repeats a frame. Select each frame at most once."
        ),
        0,
    ),
    (
        "empty selection",
        _video,
        _call("select_frames", target_frames=[]),
        _err("Execution Error: `target_frames` must be a non-empty list of integer frame indices, got []."),
        0,
    ),
    (
        "frames not a list",
        _video,
        _call("select_frames", target_frames=3),
        _err("Execution Error: `target_frames` must be a list of frame indices, got 3."),
        0,
    ),
    (
        "select on an image",
        _images,
        _call("select_frames", target_frames=[1]),
        _err(
            "Execution Error: You attempted to `select_frames` from **image** not **video**. You should use "
            "`crop_image` instead for inspecting **image**."
        ),
        0,
    ),
    # 64x48 frame -> (12, 9)-(51, 38) = 39x29 = 1131 px < 4*784 -> up-sampled to 84x56
    (
        "crop a video frame before any selection",
        _video,
        _call("crop_image", bbox_2d=[0.3, 0.3, 0.7, 0.7], target_image=16),
        "\nHere is the cropped image (Image Size: 84x56):",
        1,
    ),
    (
        "crop a video frame out of range",
        _video,
        _call("crop_image", bbox_2d=[0.3, 0.3, 0.7, 0.7], target_image=17),
        _err(
            BAD_TARGET
            + " You can only pick an image **from** the video within [1,16], but the current argument "
            "`target_image=17`."
        ),
        0,
    ),
    # selected frame 1 is 56x56 -> (8, 11)-(44, 44) = 36x33 -> 84x56
    (
        "crop selected frame 1 after a selection (the original's numbering: 2)",
        lambda: _after(_video(), SELECT_2),
        _call("crop_image", bbox_2d=[0.25, 0.3, 0.7, 0.7], target_image=2),
        "\nHere is the cropped image (Image Size: 84x56):",
        1,
    ),
    (
        "crop after a selection out of range",
        lambda: _after(_video(), SELECT_2),
        _call("crop_image", bbox_2d=[0.3, 0.3, 0.7, 0.7], target_image=1),
        _err(
            BAD_TARGET
            + " You can only pick an image within range [2,3], but the current argument `target_image=1`."
        ),
        0,
    ),
    (
        "crop after a selection past the end (the original's IndexError text)",
        lambda: _after(_video(), SELECT_2),
        _call("crop_image", bbox_2d=[0.3, 0.3, 0.7, 0.7], target_image=4),
        _err("list index out of range"),
        0,
    ),
    # dispatch errors
    (
        "unknown tool",
        _images,
        _call("rotate_image", angle=90),
        _err("Execution Error: Unknown tool 'rotate_image'. Available tools: `crop_image`, `select_frames`."),
        0,
    ),
    (
        "missing argument",
        _images,
        _call("crop_image", bbox_2d=[0.1, 0.1, 0.5, 0.5]),
        _err(
            "Execution Error: `crop_image` is missing required argument(s) `target_image`; it takes `bbox_2d`, "
            "`target_image`."
        ),
        0,
    ),
    (
        "extra argument, ignored as the original did",
        _video,
        _call("select_frames", target_frames=[1], fps=2),
        "\nHere are the selected frames (Frame Size: 56x56, Numbered 1 to 1):",
        1,
    ),
    # parse errors
    (
        "invalid JSON",
        _images,
        '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2}}\n</tool_call>',
        _err(
            "Execution Error: The tool call is not valid JSON (Expecting ',' delimiter: line 1 column 58 (char 57)): "
            '\'{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2}}\''
        ),
        0,
    ),
    (
        "JSON not an object",
        _images,
        "<tool_call>[1, 2]</tool_call>",
        _err(
            'Execution Error: The tool call must be a JSON object {"name": ..., "arguments": {...}}, got list: [1, 2]'
        ),
        0,
    ),
    (
        "missing name",
        _images,
        '<tool_call>{"arguments": {}}</tool_call>',
        _err("Execution Error: The tool call has no \"name\": {'arguments': {}}"),
        0,
    ),
    (
        "name not a string",
        _images,
        '<tool_call>{"name": 7, "arguments": {}}</tool_call>',
        _err('Execution Error: The tool call "name" must be a string, got 7'),
        0,
    ),
    (
        "missing arguments",
        _images,
        '<tool_call>{"name": "crop_image"}</tool_call>',
        _err("Execution Error: The tool call has no \"arguments\": {'name': 'crop_image'}"),
        0,
    ),
    (
        "arguments not an object",
        _images,
        '<tool_call>{"name": "crop_image", "arguments": "[0.1, 0.1, 0.5, 0.5], 1"}</tool_call>',
        _err(
            "Execution Error: The tool call \"arguments\" must be a JSON object, got '[0.1, 0.1, 0.5, 0.5], 1'"
        ),
        0,
    ),
    (
        "no tool call",
        _images,
        "The answer is \\boxed{3}.",
        _err("Execution Error: No <tool_call> block found in the response."),
        0,
    ),
]


@pytest.mark.parametrize(
    "case, make_state, response, expected, n_images", TABLE, ids=[row[0] for row in TABLE]
)
def test_scripted_table(case, make_state, response, expected, n_images):
    state = make_state()
    result = execute(parse_tool_call(response), state)
    assert isinstance(result, ToolResult)
    assert result.text == expected
    assert len(result.new_images) == n_images
    assert result.ok == (n_images > 0)
    if result.ok:
        assert result.error is None
        assert all(
            img.mode == "RGB" and img.width % 28 == 0 and img.height % 28 == 0 for img in result.new_images
        )
    else:
        assert result.text == _err(result.error)
    new_state = apply_result(state, result)
    assert len(new_state.images) == len(state.images) + n_images


def test_parse_tolerates_missing_newlines_and_takes_the_last_call():
    args = {"bbox_2d": [0.1, 0.2, 0.3, 0.4], "target_image": 1}
    compact = '<tool_call>{"name": "crop_image", "arguments": ' + json.dumps(args) + "}</tool_call>"
    spaced = (
        "<tool_call>\n  "
        + json.dumps({"name": "crop_image", "arguments": args})
        + "  \n</tool_call><|im_end|>"
    )
    assert parse_tool_call(compact) == ToolCall("crop_image", args)
    assert parse_tool_call(spaced) == ToolCall("crop_image", args)
    two = _call("select_frames", target_frames=[1]) + " then " + _call("crop_image", **args)
    assert parse_tool_call(two) == ToolCall("crop_image", args)
    # no closing tag: the rest of the text is the call, as in the original's split
    assert parse_tool_call('<tool_call>{"name": "zoom_in", "arguments": {}}') == ToolCall("zoom_in", {})


def test_parse_errors_are_values():
    for text in (
        "",
        "<tool_call></tool_call>",
        "<tool_call>{'name': 'x'}</tool_call>",
        "<tool_call>null</tool_call>",
    ):
        out = parse_tool_call(text)
        assert isinstance(out, ToolCallError) and out.message.startswith("Execution Error:"), text
    deep = "<tool_call>" + "[" * 100_000 + "]" * 100_000 + "</tool_call>"
    assert parse_tool_call(deep) == ToolCallError(
        "Execution Error: The tool call is nested too deeply to be read as JSON."
    )
    huge_int = (
        '<tool_call>{"name": "crop_image", "arguments": {"target_image": ' + "9" * 5000 + "}}</tool_call>"
    )
    assert "not valid JSON" in parse_tool_call(huge_int).message
    assert parse_tool_call(None) == ToolCallError(
        "Execution Error: expected the response text as a string, got NoneType."
    )


def test_is_tool_call_turn():
    assert is_tool_call_turn(CROP_CALL)
    assert is_tool_call_turn(CROP_CALL + "<|im_end|>")
    assert not is_tool_call_turn(CROP_CALL + "\n")  # the original's exact rule: nothing may follow
    assert not is_tool_call_turn("So the answer is \\boxed{A}.<|im_end|>")
    assert not is_tool_call_turn(CROP_CALL + " The answer is \\boxed{A}.")


def test_execute_direct_calls_with_python_values():
    state = _images()
    assert execute(ToolCall("crop_image", {"bbox_2d": (0.25, 0.25, 0.5, 0.5), "target_image": 1}), state).ok
    huge = execute(ToolCall("crop_image", {"bbox_2d": [0, 0, 10**400, 10**400], "target_image": 1}), state)
    assert "`bbox_2d` must be a list of 4 finite numbers" in huge.error
    big_target = execute(
        ToolCall("crop_image", {"bbox_2d": [0.1, 0.1, 0.5, 0.5], "target_image": 10**5000}), state
    )
    assert big_target.error == BAD_TARGET + " You can only pick an image within [1,2]"
    odd_keys = execute(
        ToolCall("crop_image", {1: 2, "bbox_2d": [0.1, 0.1, 0.5, 0.5], "target_image": 1}), state
    )
    assert odd_keys.ok and odd_keys.ignored_keys == ("1",)
    assert (
        execute("not a call", state).error
        == "Execution Error: expected a ToolCall or ToolCallError, got str."
    )
    assert execute(ToolCall(None, {}), state).name is None


def test_final_guard_records_unexpected_exceptions(monkeypatch):
    def broken(state, cfg, name, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(parse.TOOLS, "broken", parse.ToolSpec(broken, ()))
    result = execute(ToolCall("broken", {}), _images())
    assert not result.ok and result.name == "broken" and result.new_images == []
    assert result.text == _err("Execution Error: internal error while running the tool: ZeroDivisionError")
    recorded = parse.unexpected_errors()
    assert len(recorded) == 1 and "ZeroDivisionError: boom" in recorded[0]
    # a broken config is also caught by the guard rather than raised
    assert not execute(parse_tool_call(CROP_CALL), _images(), cfg="nonsense").ok
    assert len(parse.unexpected_errors()) == 2
    parse.clear_unexpected_errors()


def test_custom_config_flows_through_execute():
    cfg = OpsConfig.for_eval(crop_tool_name="crop_image_normalized")
    state = _images()
    res = execute(parse_tool_call(CROP_CALL), state, cfg)
    assert res.new_images[0].width * res.new_images[0].height >= 256 * 784
    sel = execute(parse_tool_call(_call("select_frames", target_frames=[1])), state, cfg)
    assert "You should use `crop_image_normalized` instead" in sel.error


def test_crop_pixels_through_execute():
    arr = np.full((336, 448, 3), 255, np.uint8)
    arr[100:140, 200:240] = (0, 0, 255)
    state = VisualState.for_images([Image.fromarray(arr)])
    result = execute(
        parse_tool_call(_call("crop_image", bbox_2d=[200, 100, 240, 140], target_image=1)), state
    )
    out = np.asarray(result.new_images[0])
    assert tuple(out[out.shape[0] // 2, out.shape[1] // 2]) == (0, 0, 255)
