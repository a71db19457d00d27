"""Tests of tools/prompts.py and tools/ops.py: exact prompt strings, crop geometry, pixel content, numbering."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pixel_reasoner_jax.processing.vision import resize_to_limits
from pixel_reasoner_jax.tools import ops, prompts
from pixel_reasoner_jax.tools.ops import (
    OpsConfig,
    VisualState,
    apply_result,
    crop_box,
    crop_image,
    select_frames,
)

# Written out from reference/pixel_reasoner.md §2.1-2.3, independently of the module's constants.
CROP_LINE = (
    '{"type": "function", "function": {"name": "crop_image", "description": "Zoom in on the image based on the '
    'bounding box coordinates.", "parameters": {"type": "object", "properties": {"bbox_2d": {"type": "array", '
    '"description": "coordinates for bounding box of the area you want to zoom in. minimum value is 0 and maximum '
    'value is the width/height of the image.", "items": {"type": "number"}}, "target_image": {"type": "number", '
    '"description": "The index of the image to crop. Index from 1 to the number of images. Choose 1 to operate on '
    'original image."}}, "required": ["bbox_2d", "target_image"]}}}'
)
SELECT_LINE = (
    '{"type": "function", "function": {"name": "select_frames", "description": "Select frames from a video.", '
    '"parameters": {"type": "object", "properties": {"target_frames": {"type": "array", "description": "List of '
    'frame indices to select from the video (no more than 8 frames in total).", "items": {"type": "integer", '
    '"description": "Frame index from 1 to 16."}}}, "required": ["target_frames"]}}}'
)
SYSTEM = (
    "You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + CROP_LINE
    + "\n"
    + SELECT_LINE
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
GUIDELINE = (
    "Guidelines: Understand the given visual information and the user query. Determine if it is beneficial to "
    "employ the given visual operations (tools). For a video, we can look closer by `select_frames`. For an image, "
    "we can look closer by `crop_image`. Reason with the visual information step by step, and put your final "
    "answer within \\boxed{}."
)

RED, GREEN, WHITE = (255, 0, 0), (0, 255, 0), (255, 255, 255)


def _err(message):
    return f"\nExecution error:\n{message}\n"


# ----------------------------------------------------------------------------------------------- prompts


def test_system_prompt_is_the_released_text():
    assert prompts.system_prompt() == SYSTEM
    assert prompts.system_prompt(prompts.PromptTemplates(), ("crop_image", "select_frames")) == SYSTEM


def test_system_prompt_without_tools_is_plain():
    assert prompts.system_prompt(tools=()) == "You are a helpful assistant."


def test_system_prompt_accepts_schema_dicts_and_keeps_order():
    text = prompts.system_prompt(tools=("select_frames", prompts.CROP_IMAGE_NORMALIZED_SCHEMA))
    lines = text.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert lines[0] == SELECT_LINE
    assert '"name": "crop_image_normalized"' in lines[1]
    assert "Values should be within [0.0,1.0]." in lines[1]


def test_system_prompt_rejects_unknown_tools():
    with pytest.raises(KeyError, match="unknown tool 'rotate'"):
        prompts.system_prompt(tools=("rotate",))
    with pytest.raises(TypeError, match="names or schema dicts"):
        prompts.system_prompt(tools=(3,))


def test_user_text_templates():
    assert prompts.user_text("What is it?") == "What is it?\n\n\n\n" + GUIDELINE
    assert (
        prompts.user_text("Q", mode="notool")
        == "Q\n\nPlease think step by step, and put your final answer within \\boxed{}."
    )
    custom = prompts.PromptTemplates(vcot="VCOT", notool="NT")
    assert prompts.user_text("Q", custom) == "Q\n\nVCOT"
    assert prompts.user_text("Q", custom, mode="notool") == "Q\n\nNT"
    with pytest.raises(ValueError, match="mode must be 'vcot' or 'notool', got 'cot'"):
        prompts.user_text("Q", mode="cot")
    with pytest.raises(TypeError, match="question must be a str"):
        prompts.user_text(None)


def test_terse_prompt_style_names_the_tool_without_the_block():
    terse = prompts.PROMPT_STYLES["terse"]
    assert prompts.PROMPT_STYLES["released"] == prompts.PromptTemplates()
    assert prompts.system_prompt(terse) == terse.system  # no <tools> block, whatever tools are offered
    assert "crop_image" in terse.system and "\\boxed{}" in terse.system
    assert prompts.user_text("Which colour?", terse) == "Which colour?"  # no guideline
    assert prompts.user_text("Q", terse, mode="notool") == "Q\n\n" + terse.notool


def test_templates_are_frozen_and_overridable():
    t = prompts.PromptTemplates()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.system = "x"
    custom = dataclasses.replace(t, system="Sys.", tools_header="<H>", tools_footer="<F>")
    assert prompts.system_prompt(custom, ("select_frames",)) == "Sys.<H>" + SELECT_LINE + "<F>"
    cfg = OpsConfig(templates=dataclasses.replace(t, crop_ok="[{width}|{height}]", error="ERR:{message}"))
    state = VisualState.for_images([Image.new("RGB", (448, 336), WHITE)])
    assert crop_image(state, [0.25, 0.25, 0.5, 0.5], 1, cfg).text == "[196|140]"
    assert crop_image(state, [0.25, 0.25, 0.5, 0.5], 9, cfg).text.startswith("ERR:Execution Error: Incorrect")


# ------------------------------------------------------------------------------------------------ config


def test_ops_config_defaults_and_eval():
    cfg = OpsConfig()
    assert (cfg.crop_min_pixels, cfg.crop_max_pixels) == (4 * 784, 1000 * 784)
    assert (cfg.select_min_pixels, cfg.select_max_pixels) == (4 * 784, 400 * 784)
    assert (cfg.padding, cfg.max_frames, cfg.min_crop_side) == ("capped", 8, 28)
    ev = OpsConfig.for_eval()
    assert (ev.crop_min_pixels, ev.crop_max_pixels) == (256 * 784, 5120 * 784)
    assert (ev.select_min_pixels, ev.select_max_pixels) == (None, None)
    assert OpsConfig.for_eval(padding="fixed").padding == "fixed"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(padding="none"), "padding must be one of"),
        (dict(crop_min_pixels=10, crop_max_pixels=5), "crop pixel range"),
        (dict(select_min_pixels=None), "both be set or both be None"),
        (dict(max_frames=0), "max_frames >= 1"),
    ],
)
def test_ops_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OpsConfig(**kwargs)


def test_visual_state_validation():
    img = Image.new("RGB", (30, 30))
    with pytest.raises(ValueError, match="non-empty video_frames"):
        VisualState(is_video=True)
    with pytest.raises(ValueError, match="video_frames must be None"):
        VisualState(is_video=False, video_frames=[img])
    with pytest.raises(ValueError, match="n_original=2 outside"):
        VisualState(is_video=False, images=[img], n_original=2)
    with pytest.raises(ValueError, match="seen_sizes must hold 1"):
        VisualState.for_images([img], seen_sizes=[(1, 1), (2, 2)])
    state = VisualState.for_images([img])
    assert state.images == (img,) and state.n_original == 1 and state.n_returned == 0


# ------------------------------------------------------------------------------------------ crop geometry


@pytest.mark.parametrize(
    "bbox, size, seen, padding, expected",
    [
        # 600/9600 = 0.0625 is exact in binary, so the capped box is exact: [.1875, .4375, .5625, .8125]*9600.
        ((0.25, 0.5, 0.5, 0.75), (9600, 9600), None, "capped", (1800, 4200, 5400, 7800)),
        # capped truncates (153.7 -> 153), fixed rounds (153.7 -> 154); both pad 0.1 here.
        ((0.2537, 0.2537, 0.5037, 0.5037), (1000, 1000), None, "capped", (153, 153, 603, 603)),
        ((0.2537, 0.2537, 0.5037, 0.5037), (1000, 1000), None, "fixed", (154, 154, 604, 604)),
        # capped pads 600 px (0.0857) on a 7000 px side, fixed pads 700 px; 0.1 * 100 px vertically.
        ((0.5037, 0.2537, 0.7537, 0.5037), (7000, 100), None, "capped", (2925, 15, 5875, 60)),
        ((0.5037, 0.2537, 0.7537, 0.5037), (7000, 100), None, "fixed", (2826, 15, 5976, 60)),
        # pixel coordinates are read in the seen size (1000x500), then cut from the stored 1500x700 image.
        ((100, 50, 433, 263), (1500, 700), (1000, 500), "capped", (0, 0, 799, 438)),
        ((100, 50, 433, 263), (1005, 505), None, "capped", (0, 0, 533, 313)),
        # one value >= 1 makes all four pixels (the original's rule); padding clamps at the borders.
        ((0.5, 0.5, 2, 3), (105, 105), None, "capped", (0, 0, 12, 13)),
        ((0.0, 0.0, 0.95, 0.99), (300, 200), None, "capped", (0, 0, 300, 200)),
        ((-3.0, -0.5, 0.537, 0.537), (100, 100), None, "capped", (0, 0, 63, 63)),
    ],
)
def test_crop_box(bbox, size, seen, padding, expected):
    assert crop_box(bbox, size, seen, padding) == expected


def _square_image(w=448, h=336, box=(200, 100, 240, 140), color=RED):
    arr = np.full((h, w, 3), 255, np.uint8)
    arr[box[1] : box[3], box[0] : box[2]] = color
    return Image.fromarray(arr)


def _fraction(img, color):
    arr = np.asarray(img).astype(int)
    return float((np.abs(arr - np.array(color)).sum(-1) < 60).mean())


def test_crop_contains_the_region():
    img = _square_image()
    state = VisualState.for_images([img])
    res = crop_image(state, [200 / 448, 100 / 336, 240 / 448, 140 / 336], 1)
    assert res.ok and res.error is None and len(res.new_images) == 1
    out = res.new_images[0]
    assert out.width % 28 == 0 and out.height % 28 == 0
    arr = np.asarray(out)
    assert tuple(arr[out.height // 2, out.width // 2]) == RED
    assert tuple(arr[0, 0]) == WHITE and tuple(arr[-1, -1]) == WHITE
    # The padded box is (155, 66)-(284, 173): the 40x40 square covers 1600 / (129*107) of it.
    assert crop_box((200 / 448, 100 / 336, 240 / 448, 140 / 336), (448, 336)) == (155, 66, 284, 173)
    assert _fraction(out, RED) == pytest.approx(1600 / (129 * 107), abs=0.02)
    assert res.text == f"\nHere is the cropped image (Image Size: {out.width}x{out.height}):"
    # The same region in pixel coordinates gives the same pixels.
    res_abs = crop_image(state, [200, 100, 240, 140], 1)
    assert np.array_equal(np.asarray(res_abs.new_images[0]), arr)


def test_crop_away_from_the_square_sees_none_of_it():
    state = VisualState.for_images([_square_image()])
    out = crop_image(state, [0.7, 0.6, 0.9, 0.9], 1).new_images[0]
    assert _fraction(out, RED) == 0.0


def test_crop_of_original_uses_stored_image_and_seen_size():
    # The stored original is 2x the size the model saw; pixel coordinates are in the seen size.
    big = _square_image(896, 672, box=(400, 200, 480, 280))
    state = VisualState.for_images([big], seen_sizes=[(448, 336)])
    res = crop_image(state, [200, 100, 240, 140], 1)
    expected = resize_to_limits(
        big.crop(crop_box((200, 100, 240, 140), (896, 672), (448, 336))), 4 * 784, 1000 * 784
    )
    assert np.array_equal(np.asarray(res.new_images[0]), np.asarray(expected))
    assert tuple(np.asarray(res.new_images[0])[expected.height // 2, expected.width // 2]) == RED


def test_crop_of_a_crop_uses_the_resized_crop():
    img = _square_image()
    state = VisualState.for_images([img])
    first = crop_image(state, [200 / 448, 100 / 336, 240 / 448, 140 / 336], 1)
    state = apply_result(state, first)
    assert len(state.images) == 2 and state.n_original == 1 and state.n_returned == 1
    second = crop_image(state, [0.3, 0.3, 0.7, 0.7], 2)
    crop1 = first.new_images[0]
    expected = resize_to_limits(crop1.crop(crop_box((0.3, 0.3, 0.7, 0.7), crop1.size)), 4 * 784, 1000 * 784)
    assert np.array_equal(np.asarray(second.new_images[0]), np.asarray(expected))
    assert _fraction(second.new_images[0], RED) > _fraction(crop1, RED)


def test_crop_resize_limits():
    small = VisualState.for_images([Image.new("RGB", (200, 200), WHITE)])
    res = crop_image(small, [0.5, 0.5, 0.51, 0.51], 1)  # a 42x42 cut is up-sampled to 4*784 px
    assert res.new_images[0].size == (56, 56)
    ev = crop_image(small, [0.5, 0.5, 0.51, 0.51], 1, OpsConfig.for_eval()).new_images[0]
    assert ev.size == (448, 448)  # eval minimum 256*784 px
    large = VisualState.for_images([Image.new("RGB", (2000, 1500), WHITE)])
    out = crop_image(large, [0.0, 0.0, 0.99, 0.99], 1).new_images[0]  # 3M px -> at most 1000*784
    assert out.width * out.height <= 1000 * 784 and out.width * out.height > 900 * 784


def test_crop_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    out = crop_image(VisualState.for_images([rgba]), [0.2, 0.2, 0.8, 0.8], 1).new_images[0]
    assert out.mode == "RGB" and tuple(np.asarray(out)[5, 5]) == WHITE


def test_crop_too_thin_for_smart_resize_is_an_error():
    state = VisualState.for_images([Image.new("RGB", (6000, 29), WHITE)])
    res = crop_image(state, [0, 0, 5999, 28], 1, OpsConfig(padding="fixed"))
    assert not res.ok and res.error.startswith("Execution Error: The cropped region 6000x29 cannot be shown")


def test_target_image_accepts_integral_floats_only():
    state = VisualState.for_images([_square_image()])
    assert crop_image(state, [0.1, 0.1, 0.5, 0.5], 1.0).ok
    for bad in (1.5, "1", True, None, [1], float("nan"), float("inf")):
        res = crop_image(state, [0.1, 0.1, 0.5, 0.5], bad)
        assert not res.ok and "`target_image` must be an integer image index" in res.error, bad


# ------------------------------------------------------------------------------------- video numbering


def _video(n=16, size=(64, 48)):
    return [Image.new("RGB", size, (10 * i, 255 - 10 * i, 0)) for i in range(n)]


def _color(img):
    return tuple(int(c) for c in np.asarray(img)[img.height // 2, img.width // 2])


def test_select_then_crop_numbering_is_consistent():
    frames = _video()
    state = VisualState.for_video(frames)
    observed = OpsConfig(video_crop_index="observed")

    def crop_image(state, bbox, t):
        return ops.crop_image(state, bbox, t, observed)

    # Before anything is returned, target_image indexes the video frames.
    res = crop_image(state, [0.3, 0.3, 0.7, 0.7], 5)
    assert res.ok and _color(res.new_images[0]) == _color(frames[4])
    sel = select_frames(state, [3, 9])
    assert sel.text == "\nHere are the selected frames (Frame Size: 56x56, Numbered 1 to 2):"
    assert [_color(f) for f in sel.new_images] == [_color(frames[2]), _color(frames[8])]
    state = apply_result(state, sel)
    assert state.n_selected == 2 and state.n_returned == 2 and state.n_original == 0
    # "Numbered 1 to 2" means target_image=1 is frame 3 and target_image=2 is frame 9 (the original said 2, 3).
    assert _color(crop_image(state, [0.3, 0.3, 0.7, 0.7], 1).new_images[0]) == _color(frames[2])
    crop2 = crop_image(state, [0.3, 0.3, 0.7, 0.7], 2)
    assert _color(crop2.new_images[0]) == _color(frames[8])
    state = apply_result(state, crop2)  # the crop takes number 3
    assert crop_image(state, [0.3, 0.3, 0.7, 0.7], 3).ok
    assert crop_image(state, [0.3, 0.3, 0.7, 0.7], 4).error.endswith(
        "You can only pick an image within range [1,3], but the current argument `target_image=4`."
    )
    sel2 = select_frames(state, [16])
    assert sel2.text.endswith("Numbered 4 to 4):") and _color(sel2.new_images[0]) == _color(frames[15])
    state = apply_result(state, sel2)
    assert state.n_selected == 3 and len(state.images) == 4


def test_original_video_crop_numbering_counts_the_video_as_image_1():
    # The original's list after a selection is [[video], sel1, sel2]: target_image 2 is sel1 (reference §4.1).
    frames = _video()
    state = apply_result(VisualState.for_video(frames), select_frames(VisualState.for_video(frames), [3, 9]))
    assert OpsConfig().video_crop_index == "original"
    assert _color(crop_image(state, [0.3, 0.3, 0.7, 0.7], 2).new_images[0]) == _color(frames[2])
    assert _color(crop_image(state, [0.3, 0.3, 0.7, 0.7], 3).new_images[0]) == _color(frames[8])
    assert crop_image(state, [0.3, 0.3, 0.7, 0.7], 1).error.endswith(
        "You can only pick an image within range [2,3], but the current argument `target_image=1`."
    )
    assert crop_image(state, [0.3, 0.3, 0.7, 0.7], 4).error == "list index out of range"
    with pytest.raises(ValueError, match="video_crop_index"):
        OpsConfig(video_crop_index="zero")


def test_crop_origins_compose_through_crops_of_crops():
    image = Image.new("RGB", (400, 200), "white")
    state = VisualState.for_images([image])
    assert state.origins == ((0, ops.FULL_BOX),)
    cfg = OpsConfig(padding="fixed")
    # [0.2, 0.2, 0.6, 0.6] + 0.1 padding -> [0.1, 0.1, 0.7, 0.7] of the original: pixels (40, 20, 280, 140).
    first = crop_image(state, [0.2, 0.2, 0.6, 0.6], 1, cfg)
    assert first.origins == ((0, (0.1, 0.1, 0.7, 0.7)),)
    state = apply_result(state, first)
    # Half of the crop, [0.1, 0.1, 0.6, 0.6] padded to [0.0, 0.0, 0.7, 0.7] of it: x 0.1 + 0.7 * 0.6 = 0.52.
    second = crop_image(state, [0.1, 0.1, 0.6, 0.6], 2, cfg)
    idx, box = second.origins[0]
    assert idx == 0 and box == pytest.approx((0.1, 0.1, 0.52, 0.52), abs=0.01)
    state = apply_result(state, second)
    assert [o[0] for o in state.origins] == [0, 0, 0]
    video = VisualState.for_video(_video())
    assert select_frames(video, [3, 9]).origins == ((2, ops.FULL_BOX), (8, ops.FULL_BOX))
    assert crop_image(video, [0.0, 0.0, 0.5, 0.5], 5, cfg).origins[0][0] == 4


def test_select_frames_resizing():
    frames = _video(size=(640, 480))
    res = select_frames(VisualState.for_video(frames), [1, 2])
    w, h = res.new_images[0].size
    assert w * h <= 400 * 784 and w % 28 == 0 and h % 28 == 0
    ev = select_frames(VisualState.for_video(frames), [1, 2], OpsConfig.for_eval())
    assert ev.new_images[0].size == (640, 480)
    assert ev.text == "\nHere are the selected frames (Frame Size: 640x480, Numbered 1 to 2):"


def test_apply_result_leaves_state_alone_on_error():
    state = VisualState.for_images([_square_image()])
    bad = crop_image(state, [0.5, 0.5, 0.1, 0.1], 1)
    assert not bad.ok and apply_result(state, bad) is state
    good = crop_image(state, [0.1, 0.1, 0.5, 0.5], 1)
    new = apply_result(state, good)
    assert new is not state and len(state.images) == 1 and len(new.images) == 2
    assert new.images[1] is good.new_images[0]


def test_show_never_raises():
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert ops.show(deep) == "<unprintable list>"
    assert ops.show(10**5000) == "<unprintable int>"
    assert ops.show("x" * 1000).endswith("...(truncated)")
