"""Prompt text of Pixel Reasoner: system prompt with the tool block, user-turn templates, tool schemas.

Defaults are the exact strings of the released checkpoints (reference/pixel_reasoner.md §2, §3).
"""

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

CROP_IMAGE_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "crop_image",
        "description": "Zoom in on the image based on the bounding box coordinates.",
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array",
                    "description": (
                        "coordinates for bounding box of the area you want to zoom in. minimum value is 0 and "
                        "maximum value is the width/height of the image."
                    ),
                    "items": {"type": "number"},
                },
                "target_image": {
                    "type": "number",
                    "description": (
                        "The index of the image to crop. Index from 1 to the number of images. "
                        "Choose 1 to operate on original image."
                    ),
                },
            },
            "required": ["bbox_2d", "target_image"],
        },
    },
}

SELECT_FRAMES_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "select_frames",
        "description": "Select frames from a video.",
        "parameters": {
            "type": "object",
            "properties": {
                "target_frames": {
                    "type": "array",
                    "description": "List of frame indices to select from the video (no more than 8 frames in total).",
                    "items": {"type": "integer", "description": "Frame index from 1 to 16."},
                }
            },
            "required": ["target_frames"],
        },
    },
}

# The repo's current code (555a984) registers the crop tool under this name and wording; kept so a run can
# reproduce that prompt, but the released checkpoints were trained with `crop_image` above.
CROP_IMAGE_NORMALIZED_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "crop_image_normalized",
        "description": (
            "Zoom in on the image based on the bounding box coordinates. It is useful when the object or text "
            "in the image is too small to be seen."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array",
                    "description": (
                        "coordinates for bounding box of the area you want to zoom in. Values should be within "
                        "[0.0,1.0]."
                    ),
                    "items": {"type": "number"},
                },
                "target_image": CROP_IMAGE_SCHEMA["function"]["parameters"]["properties"]["target_image"],
            },
            "required": ["bbox_2d", "target_image"],
        },
    },
}

TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "crop_image": CROP_IMAGE_SCHEMA,
    "select_frames": SELECT_FRAMES_SCHEMA,
    "crop_image_normalized": CROP_IMAGE_NORMALIZED_SCHEMA,
}

DEFAULT_TOOLS = ("crop_image", "select_frames")


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """Every fixed piece of text the model reads; override a field to change one string.

    Attributes:
      system: the base system message.
      tools_header: text between the base system message and the first tool schema line.
      tools_footer: text after the last tool schema line.
      crop_ok: observation after a crop; fields `{width}`, `{height}`.
      select_ok: observation after a frame selection; fields `{width}`, `{height}`, `{start}`, `{end}`.
      error: observation after a failed call; field `{message}`.
      vcot: user-turn template of the tool-using runs (it begins with two newlines of its own).
      notool: user-turn template of the textual baseline (no tool block).
      list_tools: write the tool block (header, one JSON schema line per tool, footer); False: the system
        message alone names the tools.
    """

    system: str = "You are a helpful assistant."
    tools_header: str = (
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    )
    tools_footer: str = (
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call>"
    )
    crop_ok: str = "\nHere is the cropped image (Image Size: {width}x{height}):"
    select_ok: str = (
        "\nHere are the selected frames (Frame Size: {width}x{height}, Numbered {start} to {end}):"
    )
    error: str = "\nExecution error:\n{message}\n"
    vcot: str = (
        "\n\nGuidelines: Understand the given visual information and the user query. Determine if it is "
        "beneficial to employ the given visual operations (tools). For a video, we can look closer by "
        "`select_frames`. For an image, we can look closer by `crop_image`. Reason with the visual information "
        "step by step, and put your final answer within \\boxed{}."
    )
    notool: str = "Please think step by step, and put your final answer within \\boxed{}."
    list_tools: bool = True


# Prompt styles a run can choose (`rollout.prompt_style`). "released": the strings above, as the released
# checkpoints were trained (the default). "terse": the CPU demos' short prompt. A 2-layer, 32-wide model
# attends nearly uniformly at first, and the ~430 tokens of tool block and guideline bury the few visual
# tokens it must read: crop-only SFT on the quarters scene, with `model.tiny_init=fan_in`, read the crop's
# colour (26 of 32 held-out right) after 150 steps with this prompt (~140 tokens per trajectory) and was
# still at the answer prior after 100 steps with the released one (~540 tokens; measured 2026-12-02). Calls, observations and answers
# keep the released format.
TERSE = PromptTemplates(
    system="You are a helpful assistant. Call crop_image to zoom in; answer in \\boxed{}.",
    vcot="",
    list_tools=False,
)
PROMPT_STYLES: dict[str, PromptTemplates] = {"released": PromptTemplates(), "terse": TERSE}


def tool_schema_line(schema: Mapping[str, Any]) -> str:
    """One schema as Qwen-Agent writes it inside <tools>: json.dumps, default separators, raw unicode."""
    return json.dumps(schema, ensure_ascii=False)


def system_prompt(
    templates: PromptTemplates | None = None,
    tools: Sequence[str | Mapping[str, Any]] = DEFAULT_TOOLS,
) -> str:
    """The system message text: the base text, then the tool block when any tool is offered.

    Args:
      templates: the strings to use; None means the released defaults.
      tools: tool names looked up in TOOL_SCHEMAS, or full schema dicts, in the order they are listed.

    Raises:
      KeyError: a tool name that TOOL_SCHEMAS does not hold.
      TypeError: a tool that is neither a name nor a mapping.
    """
    templates = templates or PromptTemplates()
    if not tools or not templates.list_tools:
        return templates.system
    lines = []
    for tool in tools:
        if isinstance(tool, str):
            if tool not in TOOL_SCHEMAS:
                raise KeyError(
                    f"unknown tool {tool!r}; expected one of {sorted(TOOL_SCHEMAS)} or a schema dict"
                )
            lines.append(tool_schema_line(TOOL_SCHEMAS[tool]))
        elif isinstance(tool, Mapping):
            lines.append(tool_schema_line(tool))
        else:
            raise TypeError(
                f"tools entries must be names or schema dicts, got {type(tool).__name__}: {tool!r}"
            )
    return templates.system + templates.tools_header + "\n".join(lines) + templates.tools_footer


def user_text(question: str, templates: PromptTemplates | None = None, mode: str = "vcot") -> str:
    """The text item of the first user turn: question, two newlines, then the mode's template.

    Raises:
      ValueError: mode is not "vcot" or "notool".
      TypeError: question is not a string.
    """
    templates = templates or PromptTemplates()
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if mode == "vcot":
        return question + "\n\n" + templates.vcot if templates.vcot else question
    if mode == "notool":
        return question + "\n\n" + templates.notool
    raise ValueError(f"mode must be 'vcot' or 'notool', got {mode!r}")
