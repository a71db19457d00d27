"""Fuzz test of parse_tool_call + execute: seeded mutations of valid calls never raise and always give a
well-formed result (an observation with images, or an error observation), and the final guard stays unused.
"""

import json
import math
import random
import re

import pytest
from PIL import Image

from pixel_reasoner_jax.tools import parse
from pixel_reasoner_jax.tools.ops import ToolResult, VisualState, apply_result
from pixel_reasoner_jax.tools.parse import ToolCall, execute, parse_tool_call

SEED = 20250522
N_TEXT = 1200  # text-level cases (parse + execute)
N_DIRECT = 600  # structured cases handed to execute as ToolCall objects

OK_TEXT = re.compile(
    r"\nHere is the cropped image \(Image Size: \d+x\d+\):"
    r"|\nHere are the selected frames \(Frame Size: \d+x\d+, Numbered \d+ to \d+\):"
)

BASE_CALLS = [
    ("crop_image", {"bbox_2d": [0.1, 0.2, 0.6, 0.7], "target_image": 1}),
    ("crop_image", {"bbox_2d": [10, 20, 90, 70], "target_image": 2}),
    ("crop_image", {"bbox_2d": [0.0, 0.0, 0.9, 0.9], "target_image": 1.0}),
    ("crop_image_normalized", {"bbox_2d": [0.3, 0.3, 0.8, 0.8], "target_image": 1}),
    ("zoom_in", {"bbox_2d": [5, 5, 60, 60], "target_image": 1}),
    ("select_frames", {"target_frames": [1, 4, 9]}),
    ("select_frames", {"target_frames": [16]}),
]

JUNK = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**63,
    10**300,
    -(10**300),
    1e308,
    -1e308,
    1e-320,
    -0.0,
    1.5,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "1",
    "0.5",
    "crop_image",
    "\u00fc\u4e2d\U0001f600",
    "\ud800",
    [],
    {},
    [[[]]],
    [None] * 4,
    ["0.1", "0.1", "0.5", "0.5"],
    [0.1, 0.1, 0.5],
    [0.1, 0.1, 0.5, 0.5, 0.9],
    list(range(1, 40)),
    {"a": [1, {"b": None}]},
    [float("nan")] * 4,
    [1e308, 1e308, 1e308, 1e308],
    [-1e308, -1e308, 1e308, 1e308],
    [10**300, 0, 10**301, 5],
]

# Python-only values (not JSON) for the direct path.
EXOTIC = [
    (1, 2),
    {1, 2},
    [0, 0, 10**400, 10**400],
    [0.1, 0.1, 0.5, 10**5000],
    b"\x00\xff",
    object(),
    range(3),
    10**5000,
    complex(1, 2),
    Image.new("RGB", (2, 2)),
]


def _states():
    images = VisualState.for_images(
        [Image.new("RGB", (120, 90), "white"), Image.new("RGB", (96, 96), "black")]
    )
    video = VisualState.for_video([Image.new("RGB", (40, 30), (15 * i, 0, 0)) for i in range(16)])
    selected = apply_result(video, execute(ToolCall("select_frames", {"target_frames": [2, 3]}), video))
    assert selected.n_returned == 2
    return [images, video, selected]


def _rand_number(rng):
    return rng.choice(
        [
            rng.uniform(-0.5, 1.5),
            rng.uniform(0, 1),
            rng.randint(-5, 200),
            rng.randint(0, 17),
            float(rng.randint(0, 4)),
            rng.choice(JUNK),
        ]
    )


def _rand_unicode(rng, n):
    return "".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(n))


def _mutate_structure(rng, name, args):
    """A structurally mutated (name, arguments) pair; arguments may stop being a dict."""
    args = json.loads(json.dumps(args))  # deep copy
    op = rng.randrange(10)
    keys = list(args)
    if op == 0 and keys:  # replace a whole argument
        args[rng.choice(keys)] = rng.choice(JUNK)
    elif op == 1 and keys:  # replace one element of a list argument
        key = rng.choice(keys)
        if isinstance(args[key], list) and args[key]:
            args[key][rng.randrange(len(args[key]))] = rng.choice(JUNK)
    elif op == 2 and keys:  # drop an argument
        del args[rng.choice(keys)]
    elif op == 3:  # add an argument
        args[rng.choice(["fps", "target_image", "bbox_2d", "target_frames", _rand_unicode(rng, 3)])] = (
            rng.choice(JUNK)
        )
    elif op == 4:  # rename the tool
        name = rng.choice(
            ["crop", "select_frame", "CROP_IMAGE", "", _rand_unicode(rng, 5), name + " ", "zoom_in"]
        )
    elif op == 5:  # random numbers everywhere
        for key in keys:
            value = args[key]
            args[key] = [_rand_number(rng) for _ in value] if isinstance(value, list) else _rand_number(rng)
    elif op == 6:  # arguments not a dict
        args = rng.choice([list(args.values()), json.dumps(args), None, 3])
    elif op == 7:  # bbox of random length / frames of random content
        if "bbox_2d" in args:
            args["bbox_2d"] = [rng.uniform(-2, 300) for _ in range(rng.randrange(7))]
        else:
            args["target_frames"] = [rng.randint(-3, 20) for _ in range(rng.randrange(12))]
    elif op == 8:  # nested junk
        key = rng.choice(keys) if keys else "x"
        value = rng.choice(JUNK)
        for _ in range(rng.randrange(1, 30)):
            value = rng.choice([[value], {"k": value}])
        args[key] = value
    # op 9: unchanged (a valid call on a possibly unsuitable state)
    return name, args


def _mutate_text(rng, text):
    """A text-level mutation of a rendered call."""
    op = rng.randrange(8)
    if op == 0:  # truncation
        return text[: rng.randrange(len(text) + 1)]
    if op == 1:  # character flips
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = chr(rng.randrange(0, 0x250))
        return "".join(chars)
    if op == 2:  # raw byte flips, decoded leniently
        raw = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return raw.decode("utf-8", errors="replace")
    if op == 3:  # numbers replaced by non-standard or oversized literals
        lit = rng.choice(
            ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "1" * 400, "0x10", "01"]
        )
        return re.sub(r"-?\d+(\.\d+)?", lambda m: lit if rng.random() < 0.5 else m.group(0), text)
    if op == 4:  # deep nesting in place of the arguments
        depth = rng.choice([10, 1000, 50_000])
        return text.replace('"arguments": ', '"arguments": ' + "[" * depth, 1)
    if op == 5:  # unicode inserted at a random position
        i = rng.randrange(len(text) + 1)
        return text[:i] + _rand_unicode(rng, rng.randint(1, 6)) + text[i:]
    if op == 6:  # tags damaged or duplicated
        return rng.choice(
            [
                text.replace("</tool_call>", ""),
                text.replace("<tool_call>", "<tool_call><tool_call>"),
                text + "<tool_call>",
                text.replace("<tool_call>", "<tool_cal>"),
                "<tool_call>" + text,
            ]
        )
    return text + "<|im_end|>"


def _render(rng, name, args):
    body = json.dumps({"name": name, "arguments": args}, allow_nan=True)
    sep = rng.choice(["\n", "", " "])
    return f"Let me look.\n<tool_call>{sep}{body}{sep}</tool_call>"


def _check(result, state):
    assert isinstance(result, ToolResult)
    if result.ok:
        assert result.error is None and result.new_images, result
        assert OK_TEXT.fullmatch(result.text), result.text
        assert all(isinstance(img, Image.Image) and img.width > 0 for img in result.new_images)
    else:
        assert isinstance(result.error, str) and result.error, result
        assert result.new_images == []
        assert result.text == "\nExecution error:\n" + result.error + "\n"
    after = apply_result(state, result)
    assert len(after.images) == len(state.images) + len(result.new_images)


@pytest.fixture(autouse=True)
def _clean_recorder():
    parse.clear_unexpected_errors()
    yield
    parse.clear_unexpected_errors()


def test_fuzz_text_path():
    rng = random.Random(SEED)
    states = _states()
    outcomes = {True: 0, False: 0}
    for _ in range(N_TEXT):
        name, args = rng.choice(BASE_CALLS)
        if rng.random() < 0.7:
            name, args = _mutate_structure(rng, name, args)
        text = _render(rng, name, args)
        if rng.random() < 0.6:
            text = _mutate_text(rng, text)
        state = rng.choice(states)
        call = parse_tool_call(text)
        result = execute(call, state)
        _check(result, state)
        outcomes[result.ok] += 1
    assert parse.unexpected_errors() == []
    # Both outcomes must be common, or the fuzzing would not reach the operations.
    assert outcomes[True] > N_TEXT // 20 and outcomes[False] > N_TEXT // 4, outcomes


def test_fuzz_direct_calls():
    rng = random.Random(SEED + 1)
    states = _states()
    outcomes = {True: 0, False: 0}
    for _ in range(N_DIRECT):
        name, args = _mutate_structure(rng, *rng.choice(BASE_CALLS))
        if isinstance(args, dict) and args and rng.random() < 0.3:
            args[rng.choice(list(args))] = rng.choice(EXOTIC)
        if rng.random() < 0.05:
            name = rng.choice([None, 3, ("crop_image",)])
        state = rng.choice(states)
        result = execute(ToolCall(name, args), state)
        _check(result, state)
        outcomes[result.ok] += 1
    assert parse.unexpected_errors() == []
    assert outcomes[True] > N_DIRECT // 20 and outcomes[False] > N_DIRECT // 4, outcomes


def test_fuzz_random_bboxes_stay_inside_the_image():
    """Random valid-typed boxes: every crop that succeeds has a positive size; failures are the known kinds."""
    rng = random.Random(SEED + 2)
    state = _states()[0]
    known = ("Cropped image is too small", "Execution Error: Invalid `bbox_2d")
    for _ in range(400):
        coords = [rng.choice([rng.uniform(-0.2, 1.2), rng.uniform(-50, 200)]) for _ in range(4)]
        result = execute(
            ToolCall("crop_image", {"bbox_2d": coords, "target_image": rng.randint(1, 2)}), state
        )
        _check(result, state)
        if not result.ok:
            assert result.error.startswith(known), result.error
        else:
            w, h = result.new_images[0].size
            assert w * h >= 4 * 784 and not math.isnan(w)
    assert parse.unexpected_errors() == []
